//! `upl` of a LoRA that carries learned tokens: as the original's `patch_pipe` followed by
//! `save_pretrained` does, the fused model folder gets the tokens in its tokenizer (new ids
//! after the vocabulary, in file order) and their vectors as new rows of the text encoder's
//! token embedding (`config.json`'s `vocab_size` grown to match).

use super::LearnedToken;
use crate::tensor_file::{self, encode_f64, OutTensor, TensorFile};
use crate::tokenizer::ClipTokenizer;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// The text encoder's token embedding key.
pub const TOKEN_EMBEDDING_KEY: &str = "text_model.embeddings.token_embedding.weight";

/// The names and ids given to learned tokens in a fused model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddedTokens {
    /// `(token, id)` of every added vector, in order.
    pub ids: Vec<(String, u32)>,
}

/// The text-encoder weight file of the model folder `dir` holding the token embedding.
fn embedding_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let te = dir.join("text_encoder");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&te)
        .with_context(|| format!("cannot read {}", te.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for f in &files {
        if tensor_file::read_header(f)?
            .entries
            .contains_key(TOKEN_EMBEDDING_KEY)
        {
            return Ok(f.clone());
        }
    }
    bail!(
        "{}: no .safetensors file holds {TOKEN_EMBEDDING_KEY}, so the learned tokens cannot be \
         added (PyTorch .bin text encoders are not rewritten: convert the model first)",
        te.display()
    )
}

/// Adds `tokens` to the model folder `dir` (a complete diffusers folder being written): the
/// tokenizer's `added_tokens.json` and `tokenizer_config.json` (and `tokenizer.json` when
/// present) list them, the text encoder's embedding grows by their vectors. Checks first that
/// no token is in the vocabulary and that the widths match; nothing is changed on an error.
pub fn add_tokens_to_model(dir: &Path, tokens: &[LearnedToken]) -> anyhow::Result<AddedTokens> {
    if tokens.is_empty() {
        return Ok(AddedTokens::default());
    }
    let tok_dir = dir.join("tokenizer");
    let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
    let emb_path = embedding_file(dir)?;
    let file = TensorFile::open(&emb_path)?;
    let entry = &file.entries[TOKEN_EMBEDDING_KEY];
    let (rows, width) = match entry.shape.as_slice() {
        [r, w] => (*r, *w),
        s => bail!(
            "{}: {TOKEN_EMBEDDING_KEY} has shape {s:?}, expected [vocab, width]",
            emb_path.display()
        ),
    };
    if tokenizer.len() != rows {
        bail!(
            "the tokenizer of the model has {} ids but its text encoder {rows} embedding rows; \
             learned tokens would get the wrong rows",
            tokenizer.len()
        );
    }
    let mut ids = vec![];
    let mut values: Vec<f64> = vec![];
    for t in tokens {
        if t.width() != width {
            bail!(
                "learned token {:?} has width {}, the model's text encoder {width}",
                t.token,
                t.width()
            );
        }
        for (i, name) in t.token_names().into_iter().enumerate() {
            if let Some(id) = tokenizer.token_id(&name) {
                bail!(
                    "learned token {name:?} is already in the model's vocabulary (id {id}); \
                     rename it (lora convert) before fusing"
                );
            }
            if ids.iter().any(|(n, _)| n == &name) {
                bail!("learned token {name:?} is given twice");
            }
            ids.push((name, (rows + ids.len()) as u32));
            let row: Vec<f32> = t
                .vectors
                .get(i)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1()?;
            values.extend(row.iter().map(|&v| v as f64));
        }
    }

    // Text encoder: the embedding with the new rows; every other tensor byte for byte.
    let mut out = Vec::with_capacity(file.entries.len());
    for (name, e) in &file.entries {
        let old = file.bytes(name)?;
        let (shape, data) = if name == TOKEN_EMBEDDING_KEY {
            let mut bytes = old.to_vec();
            bytes.extend(encode_f64(&values, e.dtype)?);
            (vec![rows + ids.len(), width], Cow::Owned(bytes))
        } else {
            (e.shape.clone(), Cow::Borrowed(old))
        };
        out.push((
            name.clone(),
            OutTensor {
                dtype: e.dtype,
                shape,
                data,
            },
        ));
    }
    tensor_file::write(&emb_path, out, &file.metadata, true)?;
    drop(file);
    edit_json(&dir.join("text_encoder/config.json"), |cfg| {
        cfg["vocab_size"] = json!(rows + ids.len());
        Ok(())
    })?;

    // Tokenizer: transformers' files after `add_tokens` + `save_pretrained`.
    let added = |id: u32, name: &str| {
        json!({"content": name, "lstrip": false, "normalized": true, "rstrip": false,
               "single_word": false, "special": false, "id": id})
    };
    let path = tok_dir.join("added_tokens.json");
    let mut map = match path.is_file() {
        true => read_json(&path)?,
        false => json!({}),
    };
    for (n, id) in &ids {
        map[n.as_str()] = json!(id);
    }
    write_json(&path, &map)?;
    edit_json(&tok_dir.join("tokenizer_config.json"), |cfg| {
        if !cfg["added_tokens_decoder"].is_object() {
            cfg["added_tokens_decoder"] = json!({});
        }
        for (n, id) in &ids {
            let mut e = added(*id, n);
            e.as_object_mut().map(|o| o.remove("id"));
            cfg["added_tokens_decoder"][id.to_string()] = e;
        }
        Ok(())
    })?;
    let fast = tok_dir.join("tokenizer.json");
    if fast.is_file() {
        edit_json(&fast, |t| {
            let list = t["added_tokens"]
                .as_array_mut()
                .context("tokenizer.json has no added_tokens list")?;
            for (n, id) in &ids {
                list.push(added(*id, n));
            }
            Ok(())
        })?;
    }
    Ok(AddedTokens { ids })
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)? + "\n";
    crate::atomic::write_file(path, true, |tmp| {
        std::fs::write(tmp, &text).with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Reads, changes and rewrites a JSON file (an object; a missing file is an error).
fn edit_json(path: &Path, f: impl FnOnce(&mut Value) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut v = read_json(path)?;
    if !v.is_object() {
        bail!("{} is not a JSON object", path.display());
    }
    f(&mut v)?;
    write_json(path, &v)
}

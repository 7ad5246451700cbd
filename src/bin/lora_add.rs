//! `lora_add`: fuse a LoRA into a model (upl) or join two LoRAs (lpl, ljl, svd), with the
//! original tool's arguments (`PATH_1 PATH_2 OUTPUT_PATH` or `--path_1 --path_2 --output_path`,
//! `--mode`, `--alpha` or `--alpha_1 --alpha_2`, `--with_text_lora`). Same as `lora add`.

#[global_allocator]
static HEAP: lora_diffusion::sys::HeapCounter = lora_diffusion::sys::HeapCounter;

fn main() -> std::process::ExitCode {
    lora_diffusion::sys::tune_allocator();
    lora_diffusion::cli::add::main()
}

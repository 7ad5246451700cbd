//! `lora_add`: fuse a LoRA into a model (upl) or join two LoRAs (lpl, ljl, svd), with the
//! original tool's flags (`--path_1 --path_2 --mode --alpha --output_path`). Same as `lora add`.

fn main() -> std::process::ExitCode {
    lora_diffusion::sys::tune_allocator();
    lora_diffusion::cli::add::main()
}

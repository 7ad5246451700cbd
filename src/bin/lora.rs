//! The `lora` command-line program.

fn main() -> std::process::ExitCode {
    lora_diffusion::sys::tune_allocator();
    lora_diffusion::cli::main()
}

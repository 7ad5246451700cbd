//! The `lora` command-line program.

#[global_allocator]
static HEAP: lora_diffusion::sys::HeapCounter = lora_diffusion::sys::HeapCounter;

fn main() -> std::process::ExitCode {
    lora_diffusion::sys::tune_allocator();
    lora_diffusion::cli::main()
}

//! `command`: a valid wasm32-wasip2 component of another world (wasi:cli/command), for tests
//! that a host refuses components that are not plugins.
fn main() {
    println!("I am a command, not a wasmhook plugin");
}

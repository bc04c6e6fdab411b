//! Compiles `proto/rewind.proto` in pure Rust (protox), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/rewind.proto");
    let fds = protox::compile(["proto/rewind.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // Chunk frames are decoded as slices of the received message, not copied out of it.
        .bytes(".rewind.v1.Chunk.data")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

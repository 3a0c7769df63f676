//! Compiles `proto/lock.proto` into Rust with tonic's prost generator.
//! The descriptor set comes from `protox` (a pure-Rust protobuf compiler), so
//! no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["lock.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

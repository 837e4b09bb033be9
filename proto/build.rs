//! Compiles `fleet/v1/*.proto` with protox (pure Rust, so no system `protoc` is needed) and generates the
//! tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "fleet/v1/agent.proto",
        "fleet/v1/node.proto",
        "fleet/v1/fleet.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }

    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}

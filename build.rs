//! Compiles proto/ with protox (pure Rust, no system protoc) and keeps the encoded descriptor
//! set for gRPC server reflection.
use prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/containerd/services/content/v1/content.proto",
    "proto/containerd/types/descriptor.proto",
    "proto/containerd/services/images/v1/images.proto",
    "proto/containerd/services/leases/v1/leases.proto",
    "proto/contentd/v1/graph.proto",
    "proto/contentd/v1/gc.proto",
    "proto/contentd/v1/blobs.proto",
    "proto/contentd/v1/registry.proto",
    "proto/contentd/v1/scrub.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".containerd.services.content.v1.ReadContentResponse.data")
        .bytes(".containerd.services.content.v1.WriteContentRequest.data")
        .bytes(".contentd.v1.PutRequest.data")
        .compile_fds(fds)?;
    Ok(())
}

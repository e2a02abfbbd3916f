//! Writes etcd-client's gRPC code into `src/rpc/generated/`, as its build script did with
//! protoc: the same protos, the same tonic-prost-build, client side only. The output is the
//! same, byte for byte, as the published crate's build script writes with protoc (checked
//! when it was vendored, with Debian's protoc 3.21.12).

use std::path::Path;

/// The protos etcd-client's build script compiled; their imports come along.
const PROTOS: [&str; 5] = [
    "etcd/api/authpb/auth.proto",
    "etcd/api/etcdserverpb/rpc.proto",
    "etcd/api/mvccpb/kv.proto",
    "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
    "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
];

/// The generated files `src/rpc/pb.rs` includes; anything else written is removed.
const KEEP: [&str; 5] = [
    "authpb.rs",
    "etcdserverpb.rs",
    "mvccpb.rs",
    "v3electionpb.rs",
    "v3lockpb.rs",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let proto = root.join("proto");
    let out = root.join("src/rpc/generated");
    let fds = protox::compile(PROTOS.map(|p| proto.join(p)), [&proto])?;
    std::fs::create_dir_all(&out)?;
    // `compile_protos` (the build script's call) adds this attribute; `compile_fds` does not.
    tonic_prost_build::configure()
        .type_attribute(".", "#[allow(clippy::all)]")
        .build_server(false)
        .out_dir(&out)
        .compile_fds(fds)?;
    for entry in std::fs::read_dir(&out)? {
        let entry = entry?;
        let name = entry.file_name();
        if !KEEP.iter().any(|k| name == *k) {
            std::fs::remove_file(entry.path())?;
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}

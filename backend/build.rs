//! Rebuild the crate when a migration is added or changed: `sqlx::migrate!` embeds `../migrations` at compile
//! time, and Cargo reruns a proc macro only when a source file it knows changed, so a new migration file was
//! otherwise left out of the binary and the tests until some Rust file changed (the build script sqlx
//! recommends).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}

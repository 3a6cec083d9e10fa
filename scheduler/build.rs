//! `sqlx::migrate!` embeds `../migrations` at compile time; a new migration
//! file alone would not rebuild the crate without this.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}

//! Prints the NodeENI CRD as YAML (`cargo run -p eni-api --example print-crd`).
fn main() -> Result<(), eni_api::Error> {
    print!("{}", eni_api::crd_yaml()?);
    Ok(())
}

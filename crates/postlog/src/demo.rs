//! `postlog demo`: placeholder, filled in below.
pub async fn run(_a: crate::cli::DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not yet")
}

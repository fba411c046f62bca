//! Supervisor tests.

use super::*;

/// Not a test: the entry point of the supervisor processes that this crate's
/// unit tests start ([`SupervisorCommand::for_test`] runs the test binary
/// with only this test selected and the attempt directory last). In a normal
/// test run there is no directory argument and it does nothing.
#[test]
fn supervisor_entry() {
    let Some(dir) = std::env::args()
        .next_back()
        .map(PathBuf::from)
        .filter(|p| p.join(RECORD).is_file())
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let code = match runtime.block_on(supervise(&dir)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("supervisor failed: {error}");
            1
        }
    };
    std::process::exit(code);
}

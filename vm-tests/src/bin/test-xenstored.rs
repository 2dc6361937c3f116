//! `test-xenstored --socket PATH [--tree FIXTURE] [--domid N] [--dump FILE]`:
//! serve a xenstore tree on a unix socket until stdin closes or the process is
//! killed. See `vm_tests::xenstored`.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = vm_tests::xenstored::main_with_args(&args) {
        eprintln!("test-xenstored: {e:#}");
        std::process::exit(2);
    }
}

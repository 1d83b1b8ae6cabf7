fn main() -> std::process::ExitCode {
    credproxy::cli::main()
}

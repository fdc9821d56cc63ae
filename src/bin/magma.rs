//! `magma`: the operator's command-line tool. A thin shell over
//! `magma::cli`: parse, run, and turn a failure into one line
//! `error: <kind>: <message>` on stderr and an exit code (see `--help`).

use std::io::{BufWriter, ErrorKind, Write};
use std::process::ExitCode;

use clap::error::ErrorKind as ClapErrorKind;

use magma::cli::{self, Cli, CliError, ErrorLine, EXIT_USAGE};

/// The same allocator as `magma-server`: `magma bench` and `magma flood`
/// allocate per commit too, and share the machine with the servers.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = cli::run(cli, &mut out).and_then(|()| out.flush().map_err(CliError::Output));
    // Output written before a failure (flood's summary) still goes out.
    let _ = out.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `magma dump | head`: the reader is gone, which is not a failure.
        Err(CliError::Output(e)) if e.kind() == ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", ErrorLine(&e));
            exit_code(e.exit_code())
        }
    }
}

/// Help and version go to stdout with exit 0; a usage error becomes
/// `error: usage: ...` (clap's explanation and usage follow) and exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    match e.kind() {
        ClapErrorKind::DisplayHelp
        | ClapErrorKind::DisplayVersion
        | ClapErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            let text = e.render().to_string();
            let text = text.trim_start_matches("error: ").trim_end();
            eprintln!("error: usage: {text}");
            exit_code(EXIT_USAGE)
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

//! Starting and stopping the binary: a listen address that cannot be bound is a clear error at
//! once (not a process that logs broker errors for ever), and SIGTERM stops every component
//! within its drain timeout, even with no broker to talk to.

mod common;

use anyhow::{Context, Result, bail};
use common::{Proc, free_port, start_dev};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_neruba"))
}

/// Runs the binary to its exit, killing it after `patience`; its status and stderr.
fn run_to_exit(args: &[String], patience: Duration) -> Result<(Option<i32>, String)> {
    let mut child = Command::new(binary())
        .args(args)
        .env("NERUBA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
            }
            return Ok((status.code(), stderr));
        }
        if started.elapsed() > patience {
            child.kill()?;
            let output = child.wait_with_output()?;
            bail!(
                "`neruba {}` still running after {patience:?}:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn every_component_exits_at_once_naming_an_address_it_cannot_bind() -> Result<()> {
    let work = tempfile::tempdir()?;
    let catalog = work.path().join("catalog.toml");
    std::fs::write(&catalog, neruba::sample::CATALOG_TOML)?;
    let catalog = catalog.display().to_string();
    let state = work.path().join("state").display().to_string();
    // Nobody listens there: the components would retry it for ever.
    let brokers = format!("127.0.0.1:{}", free_port()?);
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = taken.local_addr()?.to_string();
    let commands = [
        strings(&["dev", "--listen", &taken]),
        strings(&[
            "gateway",
            "--brokers",
            &brokers,
            "--catalog",
            &catalog,
            "--listen",
            &taken,
        ]),
        strings(&[
            "aggregator",
            "--brokers",
            &brokers,
            "--catalog",
            &catalog,
            "--state-dir",
            &state,
            "--ops-listen",
            &taken,
        ]),
        strings(&[
            "rater",
            "--brokers",
            &brokers,
            "--catalog",
            &catalog,
            "--state-dir",
            &state,
            "--ops-listen",
            &taken,
        ]),
    ];
    for args in commands {
        let started = Instant::now();
        let (code, stderr) = run_to_exit(&args, Duration::from_secs(20))?;
        assert!(
            code.is_some_and(|c| c != 0),
            "`neruba {}` exited {code:?}",
            args[0]
        );
        assert!(
            stderr.contains(&format!("listen on {taken}")),
            "`neruba {}` does not name the address:\n{stderr}",
            args[0]
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "`neruba {}` took {:?}",
            args[0],
            started.elapsed()
        );
    }
    Ok(())
}

/// Waits until `url` answers at all (the component is up).
async fn wait_until_up(url: &str, process: &Proc) -> Result<()> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(url).send().await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{} did not start:\n{}", process.name, process.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_stops_on_sigterm_within_its_drain_timeout_even_without_a_broker()
-> Result<()> {
    let work = tempfile::tempdir()?;
    let catalog = work.path().join("catalog.toml");
    std::fs::write(&catalog, neruba::sample::CATALOG_TOML)?;
    let catalog = catalog.display().to_string();
    let brokers = format!("127.0.0.1:{}", free_port()?);
    let drain = Duration::from_secs(3);
    // The drain timeout, and room for the runtime's exit (the last resort fires 1 s after it)
    // and the process's teardown on a loaded machine.
    let patience = drain + Duration::from_secs(4);
    let mut components = Vec::new();
    for name in ["gateway", "aggregator", "rater"] {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let state = work.path().join(name).display().to_string();
        let mut args = strings(&[
            name,
            "--brokers",
            &brokers,
            "--catalog",
            &catalog,
            "--drain-timeout",
            "3s",
        ]);
        if name == "gateway" {
            args.extend(strings(&["--listen", &listen]));
        } else {
            args.extend(strings(&["--ops-listen", &listen, "--state-dir", &state]));
        }
        let mut process = Proc::new(name, binary(), &args, work.path());
        process.start()?;
        components.push((process, listen));
    }
    // The gateway serves without a broker; the stages are still trying to reach it (their
    // start waits on broker metadata): the state a SIGTERM must end.
    let (gateway, listen) = &components[0];
    wait_until_up(&format!("http://{listen}/healthz"), gateway).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (process, _) in &mut components {
        assert!(
            process.running(),
            "{} exited early:\n{}",
            process.name,
            process.log_tail(20)
        );
        let started = Instant::now();
        let clean = process
            .terminate(patience)
            .with_context(|| process.log_tail(30))?;
        let took = started.elapsed();
        assert!(took <= patience, "{} took {took:?}", process.name);
        if process.name == "gateway" {
            assert!(
                clean,
                "the gateway did not stop cleanly:\n{}",
                process.log_tail(30)
            );
        }
    }

    // The whole embedded pipeline, running normally, stops cleanly.
    let (mut pipeline, _, _) = start_dev(work.path(), &["--drain-timeout", "3s"]).await?;
    let started = Instant::now();
    let clean = pipeline.terminate(patience)?;
    assert!(
        clean,
        "dev did not stop cleanly:\n{}",
        pipeline.log_tail(30)
    );
    assert!(started.elapsed() <= patience);
    Ok(())
}

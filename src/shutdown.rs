//! Signals: SIGTERM and SIGINT become a cancelled [`CancellationToken`] (every task watches the
//! token, stops taking new work and lets in-flight messages finish within the grace period);
//! SIGHUP becomes a stream of reload requests.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A token cancelled by the first SIGTERM or SIGINT. A second signal is left to the default
/// disposition only after the first was handled, so an operator can still press Ctrl-C twice.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // Cancel before logging: whatever happens to the log line, shutdown goes ahead.
        cancel.cancel();
        tracing::info!(
            signal = name,
            "shutting down: no new deliveries, finishing in-flight ones"
        );
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting now; unacked deliveries return to their queues");
        std::process::exit(1);
    });
    Ok(token)
}

/// One item per SIGHUP.
pub fn reloads() -> std::io::Result<impl futures::Stream<Item = ()> + Unpin> {
    let hup = signal(SignalKind::hangup())?;
    Ok(Box::pin(futures::stream::unfold(
        hup,
        |mut hup| async move { hup.recv().await.map(|()| ((), hup)) },
    )))
}

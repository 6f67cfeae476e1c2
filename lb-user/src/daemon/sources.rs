//! The tasks that turn the outside world into events: signals, the tick,
//! admin API commands, BIRD's state, the kernel's network changes, health
//! checks' verdicts.

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use super::{Event, TICK};
use crate::observe::admin::Command;

/// Takes over SIGHUP, SIGTERM and SIGINT. Call it before anything slow:
/// SIGHUP's default action would end the process.
pub(super) fn signals(events: mpsc::Sender<Event>) -> std::io::Result<JoinHandle<()>> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = hangup.recv() => Event::Reload,
                _ = terminate.recv() => Event::Stop,
                _ = interrupt.recv() => Event::Stop,
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    }))
}

/// An [`Event::Health`] whenever the health checker says a verdict changed.
pub(super) fn health(changed: crate::health::checker::Notify, events: mpsc::Sender<Event>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            if events.send(Event::Health).await.is_err() {
                return;
            }
        }
    })
}

pub(super) fn ticks(events: mpsc::Sender<Event>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if events.send(Event::Tick).await.is_err() {
                return;
            }
        }
    })
}

/// How often BIRD's sessions are looked at.
const BIRD_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Asks BIRD for its protocols now and then, off the daemon's loop (a
/// stuck BIRD must not hold up a health change).
pub(super) fn bird(socket: std::path::PathBuf, events: mpsc::Sender<Event>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(BIRD_EVERY);
        loop {
            tick.tick().await;
            let answer =
                crate::net::bird::protocols(&socket).await.map_err(|e| crate::errors::error_chain(&e));
            if events.send(Event::Bird(answer)).await.is_err() {
                return;
            }
        }
    })
}

/// The kernel's route, link and neighbour changes that matter to
/// interface `ifindex`, as events.
pub(super) fn netlink(
    mut messages: crate::net::watch::Messages,
    ifindex: u32,
    events: mpsc::Sender<Event>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(changes) = crate::net::watch::next(&mut messages, ifindex).await {
            if changes.any() && events.send(Event::Net(changes)).await.is_err() {
                return;
            }
        }
        tracing::warn!(
            "netlink change notifications stopped: TUN next hops are now rechecked only every minute"
        );
    })
}

/// Forwards the admin API's commands as events.
pub(super) fn commands(mut commands: mpsc::Receiver<Command>, events: mpsc::Sender<Event>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(cmd) = commands.recv().await {
            if events.send(Event::Api(cmd)).await.is_err() {
                return;
            }
        }
    })
}

//! Readiness: which components (every route's upstream and downstream, the store) are
//! connected, behind `/readyz` and `dedupd_up{component}`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::UP;

/// Which connection a [`Health`] flag describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// Every route's upstream consumer.
    Upstream,
    /// Every route's downstream publisher.
    Downstream,
    /// The key store.
    Store,
}

impl Component {
    fn label(self) -> &'static str {
        match self {
            Component::Upstream => "upstream",
            Component::Downstream => "downstream",
            Component::Store => "store",
        }
    }
}

/// Readiness: the process is ready while every route has both connections and the store answers.
#[derive(Debug)]
pub struct Health {
    /// Per component, how many holders are currently disconnected.
    down: [AtomicUsize; 3],
}

impl Health {
    /// Starts with everything down until the first connection succeeds.
    pub fn new() -> Arc<Health> {
        let health = Arc::new(Health {
            down: Default::default(),
        });
        for c in [Component::Upstream, Component::Downstream, Component::Store] {
            health.publish(c);
        }
        health
    }

    /// A flag for one holder (a route's connection, or the store) that starts down.
    pub fn flag(self: &Arc<Self>, component: Component) -> HealthFlag {
        self.down[component as usize].fetch_add(1, Ordering::SeqCst);
        self.publish(component);
        HealthFlag {
            health: self.clone(),
            component,
            up: AtomicBool::new(false),
        }
    }

    /// True while nothing is down.
    pub fn ready(&self) -> bool {
        self.down.iter().all(|d| d.load(Ordering::SeqCst) == 0)
    }

    /// True while `component` has no holder down.
    pub fn is_up(&self, component: Component) -> bool {
        self.down[component as usize].load(Ordering::SeqCst) == 0
    }

    /// Marks `component` down for good (until this `Health` is replaced: a restart or a
    /// reload), for a holder that is gone and will not come back, such as a failed route.
    pub fn hold_down(&self, component: Component) {
        self.down[component as usize].fetch_add(1, Ordering::SeqCst);
        self.publish(component);
    }

    fn publish(&self, component: Component) {
        let up = if self.is_up(component) { 1.0 } else { 0.0 };
        metrics::gauge!(UP, "component" => component.label()).set(up);
    }
}

/// One holder's connected state; dropping it counts as down no more (the holder is gone).
#[derive(Debug)]
pub struct HealthFlag {
    health: Arc<Health>,
    component: Component,
    up: AtomicBool,
}

impl HealthFlag {
    /// Marks this holder connected or not; only transitions change the counts.
    pub fn set(&self, up: bool) {
        if self.up.swap(up, Ordering::SeqCst) == up {
            return;
        }
        let counter = &self.health.down[self.component as usize];
        if up {
            counter.fetch_sub(1, Ordering::SeqCst);
        } else {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        self.health.publish(self.component);
    }
}

impl Drop for HealthFlag {
    fn drop(&mut self) {
        if !self.up.load(Ordering::SeqCst) {
            self.health.down[self.component as usize].fetch_sub(1, Ordering::SeqCst);
            self.health.publish(self.component);
        }
    }
}

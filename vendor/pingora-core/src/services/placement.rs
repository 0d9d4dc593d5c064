// corral patch: this file is new (see PATCHED.md).

//! Which thread of a no-steal runtime serves a new connection: the one serving the fewest.
//!
//! Stock pingora spawns each accepted connection on a random thread (`current_handle()`). With
//! a few dozen keep-alive connections the split is uneven (64 connections on two threads: 38/26
//! or worse about one time in six), and the busier thread sets the pace and the tail latency
//! while the other idles. Here every connection counts on its thread while it is open, and a
//! new one goes to the thread with the fewest (ties in turn).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::runtime::Handle;

tokio::task_local! {
    /// The placement of the runtime a service's `start_service` runs on (set by `run_service`).
    pub(crate) static PLACEMENT: Arc<Placement>;
}

/// The threads of one no-steal runtime and the connections each serves.
pub struct Placement {
    handles: Box<[Handle]>,
    open: Box<[AtomicUsize]>,
    next: AtomicUsize,
}

/// A connection's place on its thread; given back when dropped (the connection ended).
pub struct Placed {
    placement: Arc<Placement>,
    index: usize,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.placement.open[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Placement {
    /// `None` for fewer than two threads: there is nothing to choose.
    pub fn new(handles: Vec<Handle>) -> Option<Arc<Placement>> {
        if handles.len() < 2 {
            return None;
        }
        let open = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Some(Arc::new(Placement {
            handles: handles.into_boxed_slice(),
            open,
            next: AtomicUsize::new(0),
        }))
    }

    /// The thread for a new connection, and its place there.
    pub fn place(self: &Arc<Self>) -> (Handle, Placed) {
        let index = self.choose();
        self.open[index].fetch_add(1, Ordering::Relaxed);
        let placed = Placed {
            placement: self.clone(),
            index,
        };
        (self.handles[index].clone(), placed)
    }

    /// The index of the thread with the fewest open connections; among equals, the first from
    /// a starting point that moves on at every call.
    fn choose(&self) -> usize {
        let n = self.handles.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&i| self.open[i].load(Ordering::Relaxed))
            .unwrap_or(start)
    }

    /// Connections open on each thread.
    pub fn open(&self) -> Vec<usize> {
        self.open.iter().map(|o| o.load(Ordering::Relaxed)).collect()
    }
}

//! Time as the journal sees it: the system's clocks, or ones a test moves by hand.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::event::now_ms;

/// Two sources of "now", in milliseconds: the wall clock, for times that are written down or
/// shown, and a clock that never jumps, for deadlines that live only in memory.
pub trait Clock: Send + Sync {
    /// The wall clock: milliseconds since the Unix epoch. It may jump (NTP steps, a paused
    /// or migrated VM).
    fn now_ms(&self) -> u64;

    /// A clock that moves at the pace of real time and never backwards or in jumps, in
    /// milliseconds from the wall clock's reading when it was first asked (so that zero is
    /// long ago): for leases and queues held in memory, which a jump of the wall clock must
    /// neither end early (running a delivery twice at once) nor stretch.
    fn elapsed_ms(&self) -> u64;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn elapsed_ms(&self) -> u64 {
        static START: OnceLock<(Instant, u64)> = OnceLock::new();
        let (started, wall_ms) = START.get_or_init(|| (Instant::now(), now_ms()));
        wall_ms.saturating_add(crate::event::millis(started.elapsed()))
    }
}

/// Clocks that only move when told to.
#[derive(Debug, Default)]
pub struct ManualClock {
    elapsed: AtomicU64,
    /// What the wall clock shows ahead of `elapsed`.
    wall_ahead: AtomicU64,
}

impl ManualClock {
    /// Clocks both showing `ms`.
    pub fn at(ms: u64) -> Self {
        ManualClock { elapsed: AtomicU64::new(ms), wall_ahead: AtomicU64::new(0) }
    }

    /// Lets `ms` pass: both clocks move forward.
    pub fn advance(&self, ms: u64) {
        self.elapsed.fetch_add(ms, Ordering::SeqCst);
    }

    /// Moves only the wall clock forward by `ms`, as an NTP step does.
    pub fn jump_wall(&self, ms: u64) {
        self.wall_ahead.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.elapsed_ms().saturating_add(self.wall_ahead.load(Ordering::SeqCst))
    }

    fn elapsed_ms(&self) -> u64 {
        self.elapsed.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_that_never_jumps_starts_at_the_wall_clock_and_moves_with_real_time() {
        let clock = SystemClock;
        let (wall, before) = (clock.now_ms(), clock.elapsed_ms());
        assert!(before.abs_diff(wall) < 60_000, "wall {wall}, elapsed {before}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let after = clock.elapsed_ms();
        assert!(after >= before + 20, "{before} then {after}");
    }

    #[test]
    fn a_jump_of_the_manual_wall_clock_leaves_the_other_where_it_was() {
        let clock = ManualClock::at(1_000);
        clock.advance(500);
        assert_eq!((clock.now_ms(), clock.elapsed_ms()), (1_500, 1_500));
        clock.jump_wall(3_600_000);
        assert_eq!((clock.now_ms(), clock.elapsed_ms()), (3_601_500, 1_500));
    }
}

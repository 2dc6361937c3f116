//! Retry timing: exponential backoff with full jitter, and the jittered first
//! check-in that spreads a pool rebooting together.
//!
//! Pure logic: the random source is passed in, so tests are deterministic.
use std::time::Duration;

/// Exponential backoff with full jitter: after the n-th consecutive failure
/// wait a uniformly random time in `[0, min(cap, base * 2^n)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap, failures: 0 }
    }

    /// The agent's policy: 1 s base, capped at 5 minutes.
    pub fn agent_default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The upper bound of the next wait, without jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u64.checked_shl(self.failures.min(30)).unwrap_or(u64::MAX);
        let ms = (self.base.as_millis() as u64).saturating_mul(factor);
        Duration::from_millis(ms).min(self.cap)
    }

    /// Record a failure and return how long to wait before the next try.
    pub fn next_delay(&mut self, rng: &mut Rng) -> Duration {
        let ceil = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        rng.duration_up_to(ceil)
    }
}

/// A small xorshift64* generator: jitter needs spread, not secrecy.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// Seeded from /dev/urandom, falling back to time and pid.
    pub fn from_entropy() -> Self {
        let mut b = [0u8; 8];
        let ok =
            std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_ok();
        let seed = if ok {
            u64::from_le_bytes(b)
        } else {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
        };
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, max]`.
    pub fn duration_up_to(&mut self, max: Duration) -> Duration {
        let ms = max.as_millis() as u64;
        if ms == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(self.next_u64() % (ms + 1))
    }

    /// 16 random bytes as hex (ids for job files, temp names).
    pub fn hex_id(&mut self) -> String {
        format!("{:016x}{:016x}", self.next_u64(), self.next_u64())
    }
}

/// Delay before the first check-in: random in `[0, min(interval, 30 s)]`, so
/// a pool that boots together does not arrive at the server at once.
pub fn first_checkin_delay(interval: Duration, rng: &mut Rng) -> Duration {
    rng.duration_up_to(interval.min(Duration::from_secs(30)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let mut rng = Rng::new(7);
        let mut ceilings = vec![];
        for _ in 0..12 {
            ceilings.push(b.ceiling().as_secs());
            let d = b.next_delay(&mut rng);
            assert!(d <= Duration::from_secs(300));
        }
        assert_eq!(&ceilings[..10], &[1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(ceilings[11], 300);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(300));
    }

    #[test]
    fn jitter_is_full_and_spread() {
        // Full jitter: waits cover the whole range, not just the top.
        let mut rng = Rng::new(42);
        let max = Duration::from_secs(100);
        let v: Vec<u64> = (0..2000).map(|_| rng.duration_up_to(max).as_millis() as u64).collect();
        assert!(v.iter().all(|&x| x <= 100_000));
        let low = v.iter().filter(|&&x| x < 25_000).count();
        let high = v.iter().filter(|&&x| x > 75_000).count();
        assert!(low > 350 && high > 350, "low {low} high {high}");
    }

    #[test]
    fn first_checkin_is_bounded_by_interval_and_30s() {
        let mut rng = Rng::new(3);
        for _ in 0..100 {
            assert!(first_checkin_delay(Duration::from_secs(5), &mut rng) <= Duration::from_secs(5));
            assert!(first_checkin_delay(Duration::from_secs(600), &mut rng) <= Duration::from_secs(30));
        }
    }
}

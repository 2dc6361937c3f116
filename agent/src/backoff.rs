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
        let ms = u64::try_from(self.base.as_millis()).unwrap_or(u64::MAX).saturating_mul(factor);
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
            // The low 64 bits of the nanoseconds.
            let nanos = t.as_secs().wrapping_mul(1_000_000_000).wrapping_add(u64::from(t.subsec_nanos()));
            fallback_seed(nanos, std::process::id())
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
        let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
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

/// The seed without /dev/urandom: the clock's nanoseconds with the pid in
/// the high half, so agents started in the same nanosecond still differ.
fn fallback_seed(nanos: u64, pid: u32) -> u64 {
    nanos ^ (u64::from(pid) << 32)
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
        let v: Vec<u64> = (0..2000).map(|_| u64::try_from(rng.duration_up_to(max).as_millis()).unwrap()).collect();
        assert!(v.iter().all(|&x| x <= 100_000));
        let low = v.iter().filter(|&&x| x < 25_000).count();
        let high = v.iter().filter(|&&x| x > 75_000).count();
        assert!(low > 350 && high > 350, "low {low} high {high}");
    }

    #[test]
    fn failures_are_counted_and_reset() {
        let mut b = Backoff::agent_default();
        let mut rng = Rng::new(9);
        assert_eq!(b.failures(), 0);
        for n in 1..=3 {
            b.next_delay(&mut rng);
            assert_eq!(b.failures(), n);
        }
        b.reset();
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn rng_is_xorshift64_star() {
        // The reference xorshift64* (shifts 12, 25, 27) from seed 1.
        let mut r = Rng::new(1);
        assert_eq!(
            [r.next_u64(), r.next_u64(), r.next_u64()],
            [0x47e4_ce4b_896c_dd1d, 0xabcf_a6a8_e079_651d, 0xb9d1_0d8f_eb73_1f57]
        );
        // Seeds are made odd (never the all-zero state).
        assert_eq!(Rng::new(0).next_u64(), Rng::new(1).next_u64());
    }

    #[test]
    fn fallback_seed_mixes_the_pid_into_the_high_half() {
        assert_eq!(fallback_seed(u64::MAX, 1), u64::MAX ^ (1 << 32));
        assert_eq!(fallback_seed(0x1234, 7), (7 << 32) | 0x1234);
        assert_ne!(fallback_seed(5, 1), fallback_seed(5, 2));
    }

    #[test]
    fn both_ends_of_the_range_are_reached() {
        // [0, max] includes max: with max = 1 ms both 0 and 1 come up.
        let mut rng = Rng::new(5);
        let v: Vec<u128> = (0..200).map(|_| rng.duration_up_to(Duration::from_millis(1)).as_millis()).collect();
        assert!(v.contains(&0) && v.contains(&1) && v.iter().all(|&x| x <= 1), "{v:?}");
        assert_eq!(rng.duration_up_to(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn hex_ids_are_32_hex_digits_and_differ() {
        let mut rng = Rng::new(11);
        let (a, b) = (rng.hex_id(), rng.hex_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, b);
        // The two halves are two draws.
        assert_eq!(&a[..16], format!("{:016x}", Rng::new(11).next_u64()));
    }

    #[test]
    fn first_checkin_is_spread_not_zero() {
        // The point of the delay is spread: a pool must not all wait 0.
        let mut rng = Rng::new(13);
        let v: Vec<Duration> = (0..100).map(|_| first_checkin_delay(Duration::from_secs(20), &mut rng)).collect();
        assert!(v.iter().filter(|d| d.is_zero()).count() < 5, "{v:?}");
        assert!(v.iter().any(|d| *d > Duration::from_secs(10)), "{v:?}");
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

//! Throttling of failed logins, per source address and per account.
//!
//! Sans-IO: the caller passes the time and acts on the answers. Device secrets are 256-bit
//! random values, so guessing one is hopeless; the throttle exists so that a guessing peer
//! costs little and learns nothing, and so that it cannot lock the real user out:
//!
//! - Every failure is answered no earlier than `failure_delay` after it arrives, and the
//!   failures of one address prefix (IPv4 address, IPv6 /64) and of one account name are
//!   answered one after another, `failure_delay` apart: N parallel attempts take as long as
//!   N sequential ones.
//! - An address prefix may fail `address_burst` times, then once per `address_refill`
//!   (a token bucket). Past that, its attempts are refused without checking the secret.
//! - An account name may fail `account_burst` times, then once per `account_refill`, from
//!   all addresses together. Past that, attempts for it are refused without checking the
//!   secret, except from a prefix with no failures on record: a correct secret from a new
//!   address still works while someone else is guessing, and every guessing prefix gets at
//!   most one check per `address_refill` while the account is over its limit.
//! - Unknown accounts are tracked exactly like existing ones (same path, same reply).
//! - Each table holds at most [`MAX_TRACKED`] keys; when full, idle keys go first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most address prefixes, and most account names, the throttle remembers at once.
pub const MAX_TRACKED: usize = 65_536;

/// Default `[auth]` settings.
pub const DEFAULT_FAILURE_DELAY: Duration = Duration::from_millis(200);
pub const DEFAULT_ADDRESS_BURST: u32 = 10;
pub const DEFAULT_ADDRESS_REFILL: Duration = Duration::from_secs(6);
pub const DEFAULT_ACCOUNT_BURST: u32 = 100;
pub const DEFAULT_ACCOUNT_REFILL: Duration = Duration::from_secs(1);
/// A failure is never held longer than this (the connection's auth timeout).
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);

/// The throttle's settings (`[auth]` in postlog.toml).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub failure_delay: Duration,
    pub address_burst: u32,
    pub address_refill: Duration,
    pub account_burst: u32,
    pub account_refill: Duration,
    pub max_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            failure_delay: DEFAULT_FAILURE_DELAY,
            address_burst: DEFAULT_ADDRESS_BURST,
            address_refill: DEFAULT_ADDRESS_REFILL,
            account_burst: DEFAULT_ACCOUNT_BURST,
            account_refill: DEFAULT_ACCOUNT_REFILL,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }
}

/// The key of a source address: IPv4 addresses alone, IPv6 addresses by their /64 (one
/// customer's network), IPv4-mapped IPv6 addresses as IPv4.
pub fn prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// What to do with an Auth attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Check the secret.
    Check,
    /// Over a limit: refuse without checking (answered like a failure).
    Refuse,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    /// The failures of this key are answered one after another: the last answer's time.
    busy_until: Instant,
}

impl Bucket {
    fn new(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: burst as f64,
            refilled: now,
            busy_until: now,
        }
    }

    fn refill(&mut self, burst: u32, every: Duration, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled);
        if !every.is_zero() {
            self.tokens = (self.tokens + dt.as_secs_f64() / every.as_secs_f64()).min(burst as f64);
        } else {
            self.tokens = burst as f64;
        }
        // Callers may pass an earlier time than the last one (an attempt that arrived
        // before another was recorded): never move the refill clock back.
        self.refilled = self.refilled.max(now);
    }

    fn idle(&self, burst: u32, now: Instant) -> bool {
        self.tokens >= burst as f64 && self.busy_until <= now
    }
}

struct Table<K> {
    map: HashMap<K, Bucket>,
    burst: u32,
    refill: Duration,
}

impl<K: std::hash::Hash + Eq + Clone> Table<K> {
    fn new(burst: u32, refill: Duration) -> Self {
        Table {
            map: HashMap::new(),
            burst,
            refill,
        }
    }

    /// The key's bucket, refilled to `now`; `None` if the key is unknown (a full bucket).
    fn peek(&mut self, key: &K, now: Instant) -> Option<Bucket> {
        let (burst, refill) = (self.burst, self.refill);
        self.map.get_mut(key).map(|b| {
            b.refill(burst, refill, now);
            *b
        })
    }

    fn entry(&mut self, key: &K, now: Instant) -> &mut Bucket {
        if !self.map.contains_key(key) && self.map.len() >= MAX_TRACKED {
            let (burst, refill) = (self.burst, self.refill);
            self.map.retain(|_, b| {
                b.refill(burst, refill, now);
                !b.idle(burst, now)
            });
            if self.map.len() >= MAX_TRACKED {
                // Still full of active keys: forget the one answered longest ago.
                if let Some(k) = self
                    .map
                    .iter()
                    .min_by_key(|(_, b)| b.busy_until)
                    .map(|(k, _)| k.clone())
                {
                    self.map.remove(&k);
                }
            }
        }
        let (burst, refill) = (self.burst, self.refill);
        let b = self
            .map
            .entry(key.clone())
            .or_insert_with(|| Bucket::new(burst, now));
        b.refill(burst, refill, now);
        b
    }
}

/// Failed-login bookkeeping for one server.
pub struct AuthThrottle {
    limits: Limits,
    addresses: Table<IpAddr>,
    accounts: Table<String>,
}

impl AuthThrottle {
    pub fn new(limits: Limits) -> AuthThrottle {
        AuthThrottle {
            limits,
            addresses: Table::new(limits.address_burst, limits.address_refill),
            accounts: Table::new(limits.account_burst, limits.account_refill),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether to check the secret of an attempt from `ip` for `account`.
    pub fn admit(&mut self, ip: IpAddr, account: &str, now: Instant) -> Admit {
        let p = prefix(ip);
        let addr = self.addresses.peek(&p, now);
        if addr.is_some_and(|b| b.tokens < 1.0) {
            return Admit::Refuse;
        }
        let clean = addr.is_none_or(|b| b.tokens >= self.limits.address_burst as f64);
        let acct = self.accounts.peek(&account.to_string(), now);
        if acct.is_some_and(|b| b.tokens < 1.0) && !clean {
            return Admit::Refuse;
        }
        Admit::Check
    }

    /// Records a failed (or refused) attempt; returns when to answer it.
    pub fn failed(&mut self, ip: IpAddr, account: &str, now: Instant) -> Instant {
        let delay = self.limits.failure_delay;
        let latest = now + self.limits.max_wait;
        let a = self.addresses.entry(&prefix(ip), now);
        a.tokens = (a.tokens - 1.0).max(0.0);
        let a_busy = a.busy_until;
        let b = self.accounts.entry(&account.to_string(), now);
        b.tokens = (b.tokens - 1.0).max(0.0);
        let at = (a_busy.max(b.busy_until).max(now) + delay).min(latest);
        b.busy_until = b.busy_until.max(at);
        let a = self.addresses.entry(&prefix(ip), now);
        a.busy_until = a.busy_until.max(at);
        at
    }

    /// How many prefixes and account names are remembered.
    pub fn tracked(&self) -> (usize, usize) {
        (self.addresses.map.len(), self.accounts.map.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits {
            failure_delay: 100 * MS,
            address_burst: 3,
            address_refill: 1000 * MS,
            account_burst: 5,
            account_refill: 1000 * MS,
            max_wait: 10_000 * MS,
        }
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(prefix(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            prefix(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            prefix(ip("2001:db8:1:2::7"))
        );
        assert_ne!(prefix(ip("2001:db8:1:3::1")), prefix(ip("2001:db8:1:2::1")));
        assert_eq!(prefix(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_ne!(prefix(ip("192.0.2.1")), prefix(ip("192.0.2.2")));
    }

    #[test]
    fn parallel_failures_are_answered_as_late_as_sequential_ones() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(limits());
        // Three attempts arrive together from one address: answered 100 ms apart.
        let answers: Vec<_> = (0..3)
            .map(|_| {
                assert_eq!(t.admit(ip("10.0.0.1"), "ann", t0), Admit::Check);
                t.failed(ip("10.0.0.1"), "ann", t0)
            })
            .collect();
        assert_eq!(answers, [t0 + 100 * MS, t0 + 200 * MS, t0 + 300 * MS]);
        // Sequential: each waits for the previous answer, then 100 ms.
        let mut s = AuthThrottle::new(limits());
        let mut now = t0;
        for _ in 0..3 {
            now = s.failed(ip("10.0.0.1"), "ann", now);
        }
        assert_eq!(now, *answers.last().unwrap_or(&t0));
    }

    #[test]
    fn an_address_over_its_burst_is_refused_and_refills() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(limits());
        let a = ip("2001:db8::1");
        for _ in 0..3 {
            assert_eq!(t.admit(a, "ann", t0), Admit::Check);
            t.failed(a, "ann", t0);
        }
        // Over the limit, even from another address of the same /64.
        assert_eq!(t.admit(ip("2001:db8::2"), "ann", t0), Admit::Refuse);
        assert_eq!(t.admit(a, "bob", t0), Admit::Refuse);
        // A new address is unaffected; one token comes back per refill period.
        assert_eq!(t.admit(ip("2001:db8:0:1::1"), "ann", t0), Admit::Check);
        assert_eq!(t.admit(a, "ann", t0 + 999 * MS), Admit::Refuse);
        assert_eq!(t.admit(a, "ann", t0 + 1000 * MS), Admit::Check);
    }

    #[test]
    fn an_account_over_its_burst_refuses_guessers_but_not_new_addresses() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(limits());
        // Five addresses fail once each: the account's burst is spent.
        for i in 1..=5 {
            let a = ip(&format!("10.0.0.{i}"));
            assert_eq!(t.admit(a, "ann", t0), Admit::Check);
            t.failed(a, "ann", t0);
        }
        // A guesser that failed before is refused without a check...
        assert_eq!(t.admit(ip("10.0.0.1"), "ann", t0), Admit::Refuse);
        // ...while a new address (the real user) is still checked, and other accounts
        // are not affected.
        assert_eq!(t.admit(ip("10.0.0.9"), "ann", t0), Admit::Check);
        assert_eq!(t.admit(ip("10.0.0.1"), "bob", t0), Admit::Check);
        // Failures to one account from many addresses are answered one after another.
        assert_eq!(t.failed(ip("10.0.0.9"), "ann", t0), t0 + 600 * MS);
    }

    #[test]
    fn answers_wait_at_most_max_wait_and_tables_stay_bounded() {
        let t0 = Instant::now();
        let mut t = AuthThrottle::new(limits());
        let mut last = t0;
        for _ in 0..1000 {
            last = t.failed(ip("10.0.0.1"), "ann", t0);
        }
        assert_eq!(last, t0 + 10_000 * MS);
        let mut t = AuthThrottle::new(limits());
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(i));
            t.failed(a, "x", t0);
        }
        assert!(t.tracked().0 <= MAX_TRACKED);
    }
}

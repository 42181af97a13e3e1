//! Open connections per user and per client address on this gateway: a
//! handshake over either cap is refused with 429 before the upgrade, and a
//! connection holds a [`Ticket`] that gives its place back when it ends.

use std::sync::Arc;

use dashmap::DashMap;
use unhidra_core::ids::UserId;
use unhidra_runtime::ClientIp;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    User(usize),
    Ip(usize),
}

impl Full {
    pub fn message(self) -> String {
        match self {
            Self::User(max) => format!("this user already has {max} open connections"),
            Self::Ip(max) => format!("this address already has {max} open connections"),
        }
    }
}

pub struct Admission {
    per_user: DashMap<UserId, usize>,
    per_ip: DashMap<String, usize>,
    max_per_user: usize,
    max_per_ip: usize,
}

impl Admission {
    pub fn new(max_per_user: usize, max_per_ip: usize) -> Self {
        Self {
            per_user: DashMap::new(),
            per_ip: DashMap::new(),
            max_per_user,
            max_per_ip,
        }
    }

    /// Whether a connection of `user` from `ip` would fit now (the check
    /// before the upgrade; [`Admission::admit`] decides).
    pub fn check(&self, user: UserId, ip: &ClientIp) -> Result<(), Full> {
        if self
            .per_user
            .get(&user)
            .is_some_and(|c| *c >= self.max_per_user)
        {
            return Err(Full::User(self.max_per_user));
        }
        if self
            .per_ip
            .get(&ip.key())
            .is_some_and(|c| *c >= self.max_per_ip)
        {
            return Err(Full::Ip(self.max_per_ip));
        }
        Ok(())
    }

    /// Takes a place for a connection, if both caps allow it.
    pub fn admit(self: &Arc<Self>, user: UserId, ip: &ClientIp) -> Result<Ticket, Full> {
        let ip = ip.key();
        {
            let mut users = self.per_user.entry(user).or_insert(0);
            if *users >= self.max_per_user {
                return Err(Full::User(self.max_per_user));
            }
            *users += 1;
        }
        let mut ips = self.per_ip.entry(ip.clone()).or_insert(0);
        if *ips >= self.max_per_ip {
            drop(ips);
            release(&self.per_user, &user);
            return Err(Full::Ip(self.max_per_ip));
        }
        *ips += 1;
        Ok(Ticket {
            admission: Arc::clone(self),
            user,
            ip,
        })
    }
}

/// Removes one from `key`'s count, and the entry when it reaches zero.
fn release<K: std::hash::Hash + Eq>(map: &DashMap<K, usize>, key: &K) {
    map.remove_if_mut(key, |_, count| {
        *count = count.saturating_sub(1);
        *count == 0
    });
}

/// One connection's place; given back when dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    user: UserId,
    ip: String,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        release(&self.admission.per_user, &self.user);
        release(&self.admission.per_ip, &self.ip);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn caps_hold_per_user_and_per_address_and_places_come_back() {
        let admission = Arc::new(Admission::new(2, 3));
        let (ann, bob) = (UserId::new(), UserId::new());
        let here = ClientIp(IpAddr::from([203, 0, 113, 7]));
        let first = admission.admit(ann, &here);
        let second = admission.admit(ann, &here);
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(admission.check(ann, &here), Err(Full::User(2)));
        assert_eq!(admission.admit(ann, &here).err(), Some(Full::User(2)));
        let third = admission.admit(bob, &here);
        assert!(third.is_ok());
        assert_eq!(admission.admit(bob, &here).err(), Some(Full::Ip(3)));
        assert_eq!(admission.check(bob, &here), Err(Full::Ip(3)));
        drop(third);
        assert_eq!(
            admission.check(bob, &here),
            Ok(()),
            "the address has room again"
        );
        assert_eq!(admission.check(ann, &here), Err(Full::User(2)));
        drop(first);
        assert_eq!(admission.check(ann, &here), Ok(()));
        drop(second);
        assert!(admission.per_user.is_empty() && admission.per_ip.is_empty());
    }
}

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use super::*;

fn fates(imp: &Impairment, n: usize) -> Vec<Fate> {
    let mut rng = SplitMix64::new(imp.seed);
    (0..n)
        .map(|_| imp.fate(&mut rng, Duration::from_secs(1)))
        .collect()
}

#[test]
fn a_fixed_seed_reproduces_every_decision() {
    let imp = Impairment {
        loss: 0.1,
        duplicate: 0.05,
        reorder: 0.05,
        reorder_delay: Duration::from_millis(5),
        jitter: Duration::from_millis(3),
        seed: 42,
        ..Impairment::rtt(Duration::from_millis(50))
    };
    assert_eq!(fates(&imp, 10_000), fates(&imp, 10_000));
    let other = Impairment {
        seed: 43,
        ..imp.clone()
    };
    assert_ne!(fates(&imp, 10_000), fates(&other, 10_000));
    // The rates come out as asked (10,000 draws: within 1.5 points).
    let f = fates(&imp, 10_000);
    let lost = f.iter().filter(|f| **f == Fate::Lost).count() as f64 / 1e4;
    let dup = f
        .iter()
        .filter(|f| {
            matches!(
                f,
                Fate::Deliver {
                    duplicate: Some(_),
                    ..
                }
            )
        })
        .count() as f64
        / 1e4;
    assert!((lost - 0.1).abs() < 0.015, "{lost}");
    assert!((dup - 0.05 * 0.9).abs() < 0.015, "{dup}");
    for f in f {
        if let Fate::Deliver {
            after, reordered, ..
        } = f
        {
            let base = Duration::from_millis(25);
            let max = base + Duration::from_millis(3) + Duration::from_millis(5);
            assert!(after >= base && after <= max);
            assert!(reordered || after <= base + Duration::from_millis(3));
        }
    }
}

#[test]
fn blackout_windows_drop_everything_inside_them() {
    let imp = Impairment {
        blackouts: vec![Blackout {
            start: Duration::from_secs(1),
            len: Duration::from_secs(2),
        }],
        ..Impairment::default()
    };
    let mut rng = SplitMix64::new(1);
    for (t, blacked) in [(0.5, false), (1.0, true), (2.9, true), (3.0, false)] {
        let f = imp.fate(&mut rng, Duration::from_secs_f64(t));
        assert_eq!(f == Fate::BlackedOut, blacked, "at {t} s");
    }
}

/// A UDP echo server; returns its address.
async fn echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

#[tokio::test]
async fn udp_proxy_delays_keeps_order_and_blacks_out() {
    let proxy = UdpProxy::start(echo().await, Impairment::rtt(Duration::from_millis(40)))
        .await
        .unwrap();
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(proxy.local_addr()).await.unwrap();
    proxy.record(true);
    let t = Instant::now();
    for i in 0..50u8 {
        c.send(&[i]).await.unwrap();
    }
    let mut buf = [0u8; 16];
    for i in 0..50u8 {
        let n = c.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &[i], "no reordering without jitter or reorder");
    }
    assert!(
        t.elapsed() >= Duration::from_millis(40),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(proxy.recorded().len(), 50);
    let s = proxy.stats();
    assert_eq!((s.received, s.delivered, s.lost), (100, 100, 0));

    proxy.blackout(Duration::from_secs(60));
    c.send(b"x").await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(200), c.recv(&mut buf)).await;
    assert!(r.is_err(), "nothing passes a blackout");
    assert_eq!(proxy.stats().blacked_out, 1);
}

#[tokio::test]
async fn tcp_proxy_adds_its_delay_each_way() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        s.write_all(&b).await.unwrap();
    });
    let proxy = TcpProxy::start(up, Duration::from_millis(25))
        .await
        .unwrap();
    let mut c = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let t = Instant::now();
    c.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    assert!(
        t.elapsed() >= Duration::from_millis(50),
        "{:?}",
        t.elapsed()
    );
}

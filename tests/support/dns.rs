//! A real DNS server for tests: hickory-server with an in-memory, authoritative zone on
//! 127.0.0.1 (UDP and TCP on one ephemeral port). Names outside the zone's records get
//! NXDOMAIN, as from any authoritative server.

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, MX, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub struct Zone {
    origin: String,
    records: Vec<(String, RData)>,
}

fn name(s: &str) -> Name {
    let s = if s.ends_with('.') {
        s.to_string()
    } else {
        format!("{s}.")
    };
    Name::from_ascii(&s).expect("valid DNS name")
}

impl Zone {
    pub fn new(origin: &str) -> Zone {
        Zone {
            origin: origin.to_string(),
            records: Vec::new(),
        }
    }
    pub fn mx(mut self, domain: &str, preference: u16, host: &str) -> Zone {
        self.records
            .push((domain.into(), RData::MX(MX::new(preference, name(host)))));
        self
    }
    /// RFC 7505 null MX: `MX 0 .`
    pub fn null_mx(mut self, domain: &str) -> Zone {
        self.records
            .push((domain.into(), RData::MX(MX::new(0, Name::root()))));
        self
    }
    pub fn a(mut self, host: &str, ip: Ipv4Addr) -> Zone {
        self.records.push((host.into(), RData::A(A(ip))));
        self
    }
}

pub struct TestDns {
    pub addr: SocketAddr,
}

/// Starts the server on `rt`; it lives as long as the runtime.
pub fn start(rt: &tokio::runtime::Runtime, zone: Zone) -> TestDns {
    let origin = name(&zone.origin);
    let mut handler: InMemoryZoneHandler =
        InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(
        name(&format!("ns.{}", zone.origin)),
        name(&format!("hostmaster.{}", zone.origin)),
        1,
        3600,
        600,
        86400,
        60,
    );
    assert!(handler.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1));
    for (n, rdata) in zone.records {
        assert!(handler.upsert_mut(Record::from_rdata(name(&n), 60, rdata), 1));
    }
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(handler)]);
    let addr = rt.block_on(async move {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind udp");
        let addr = udp.local_addr().expect("addr");
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
            server.register_listener(tcp, Duration::from_secs(5), 65535);
        }
        // The server runs on its tasks; keep it alive for the runtime's life.
        tokio::spawn(async move {
            let _ = server.block_until_done().await;
        });
        addr
    });
    TestDns { addr }
}

//! Command-line adjustments applied to a config file as it is loaded (and on every reload):
//! a port offset and a data root. They let one set of shipped configs run twice on one
//! machine (two fleets on a laptop, or tests on spare ports) without editing the files.

use std::path::PathBuf;

use super::model::Config;
use super::storage::StorageTarget;

/// What `--port-offset` and `--data-root` change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Added to every non-zero port the config names: listeners, the admin address, and the
    /// addresses it connects to (backends, upstreams, storage primary, replicas, follow), so
    /// a whole fleet shifts together and still finds itself.
    pub port_offset: u16,
    /// A relative `node.data_dir` is placed under this directory.
    pub data_root: Option<PathBuf>,
}

impl Overrides {
    /// True when nothing is adjusted.
    pub fn is_empty(&self) -> bool {
        self.port_offset == 0 && self.data_root.is_none()
    }

    /// Applies the adjustments; fails (naming the setting) when a shifted port passes 65535.
    pub fn apply(&self, config: &mut Config) -> Result<(), (String, String)> {
        if let Some(root) = &self.data_root {
            if config.node.data_dir.is_relative() {
                config.node.data_dir = root.join(&config.node.data_dir);
            }
        }
        let off = self.port_offset;
        if off == 0 {
            return Ok(());
        }
        shift_addr(&mut config.node.admin, off, "node.admin")?;
        if let Some(app) = &mut config.app {
            shift_addr(&mut app.listen, off, "app.listen")?;
            if let StorageTarget::Remote(r) = &mut app.storage {
                r.primary = shift_str(&r.primary, off, "app.storage.primary")?;
                for r in &mut r.replicas {
                    *r = shift_str(r, off, "app.storage.replicas")?;
                }
            }
        }
        if let Some(st) = &mut config.storage {
            shift_addr(&mut st.listen, off, "storage.listen")?;
            if let Some(f) = &mut st.follow {
                *f = shift_str(f, off, "storage.follow")?;
            }
        }
        if let Some(b) = &mut config.balancer {
            shift_addr(&mut b.listen, off, "balancer.listen")?;
            for be in &mut b.backends {
                shift_addr(&mut be.address, off, "balancer.backends")?;
            }
        }
        if let Some(e) = &mut config.edge {
            shift_addr(&mut e.listen, off, "edge.listen")?;
            for u in &mut e.upstreams {
                *u = shift_str(u, off, "edge.upstreams")?;
            }
        }
        Ok(())
    }
}

fn shifted(port: u16, off: u16, field: &str) -> Result<u16, (String, String)> {
    if port == 0 {
        return Ok(0);
    }
    port.checked_add(off).ok_or_else(|| {
        (
            field.to_owned(),
            format!("port {port} plus --port-offset {off} passes 65535"),
        )
    })
}

fn shift_addr(
    addr: &mut std::net::SocketAddr,
    off: u16,
    field: &str,
) -> Result<(), (String, String)> {
    addr.set_port(shifted(addr.port(), off, field)?);
    Ok(())
}

/// Shifts the port of a `host:port` string; anything else is left for validation to refuse.
fn shift_str(s: &str, off: u16, field: &str) -> Result<String, (String, String)> {
    match s.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(p) => Ok(format!("{host}:{}", shifted(p, off, field)?)),
            Err(_) => Ok(s.to_owned()),
        },
        None => Ok(s.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_shifts_every_address_and_keeps_port_zero() {
        let text = r#"
[node]
admin = "127.0.0.1:9900"
data_dir = "d"
[app]
listen = "127.0.0.1:0"
storage = { primary = "db.internal:7000", replicas = ["127.0.0.1:7001"] }
[balancer]
listen = "127.0.0.1:8000"
backends = ["127.0.0.1:8081"]
[edge]
listen = "127.0.0.1:8443"
upstreams = ["localhost:8000"]
"#;
        let mut c: Config = toml::from_str(text).unwrap();
        Overrides {
            port_offset: 100,
            data_root: Some("/tmp/x".into()),
        }
        .apply(&mut c)
        .unwrap();
        assert_eq!(c.node.admin.port(), 10000);
        assert_eq!(c.node.data_dir, PathBuf::from("/tmp/x/d"));
        let app = c.app.as_ref().unwrap();
        assert_eq!(app.listen.port(), 0);
        let StorageTarget::Remote(r) = &app.storage else {
            panic!("remote")
        };
        assert_eq!(r.primary, "db.internal:7100");
        assert_eq!(r.replicas, vec!["127.0.0.1:7101".to_owned()]);
        let b = c.balancer.as_ref().unwrap();
        assert_eq!(
            (b.listen.port(), b.backends[0].address.port()),
            (8100, 8181)
        );
        let e = c.edge.as_ref().unwrap();
        assert_eq!(
            (e.listen.port(), e.upstreams[0].as_str()),
            (8543, "localhost:8100")
        );
        let err = Overrides {
            port_offset: 60000,
            data_root: None,
        }
        .apply(&mut c)
        .unwrap_err();
        assert_eq!(err.0, "node.admin");
    }
}

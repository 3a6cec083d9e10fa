//! The agent's persisted desired state: the last full state the scheduler
//! sent, with its generation. It survives agent restarts (so reconciling goes
//! on while the scheduler is away) and rejects stale generations.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use clawdeploy_proto::DesiredState;
use prost::Message;

use crate::error::{Error, Result};

pub struct Ledger {
    path: PathBuf,
    current: DesiredState,
}

/// What `accept` did with an incoming state.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    Newer,
    Same,
    Stale { have: u64 },
}

impl Ledger {
    pub fn open(state_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))?;
        let path = state_dir.join("desired-state.pb");
        let current = match std::fs::read(&path) {
            Ok(bytes) => DesiredState::decode(bytes.as_slice())
                .map_err(|e| Error::Ledger(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DesiredState::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(Self { path, current })
    }

    pub fn current(&self) -> &DesiredState {
        &self.current
    }

    /// Persists `state` when its generation is at least the current one.
    pub fn accept(&mut self, state: DesiredState) -> Result<Accepted> {
        if state.generation < self.current.generation {
            return Ok(Accepted::Stale {
                have: self.current.generation,
            });
        }
        if state.generation == self.current.generation && state == self.current {
            return Ok(Accepted::Same);
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("desired-state.pb");
        clawdeploy_common::fs::write_private_atomically(dir, name, &state.encode_to_vec(), None)?;
        self.current = state;
        Ok(Accepted::Newer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_rejects_stale_generations() {
        let dir =
            std::env::temp_dir().join(format!("cd-ledger-{}-{}", std::process::id(), line!()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut l = Ledger::open(&dir).unwrap();
        assert_eq!(l.current().generation, 0);
        assert_eq!(
            l.accept(DesiredState {
                generation: 5,
                containers: vec![]
            })
            .unwrap(),
            Accepted::Newer
        );
        assert_eq!(
            l.accept(DesiredState {
                generation: 4,
                containers: vec![]
            })
            .unwrap(),
            Accepted::Stale { have: 5 }
        );
        assert_eq!(
            l.accept(DesiredState {
                generation: 5,
                containers: vec![]
            })
            .unwrap(),
            Accepted::Same
        );
        // A restarted agent starts from what it persisted.
        let l2 = Ledger::open(&dir).unwrap();
        assert_eq!(l2.current().generation, 5);
        let mode = std::fs::metadata(dir.join("desired-state.pb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the ledger holds secrets");
        std::fs::remove_dir_all(&dir).ok();
    }
}

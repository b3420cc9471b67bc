//! Private files and directories: the data directory, databases, the spool and key files hold
//! tokens' digests, channel secrets and signing keys, so only the server's user may read them.
//! Directories are made 0700 and files 0600 when created, and tightened when found looser.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and any missing parents with mode 0700; an existing `dir` is tightened to 0700
/// (its parents are left alone: they may be shared, like /var/lib).
pub fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    tighten(dir, DIR_MODE)
}

/// Options that create a file with mode 0600 (before any byte is written to it).
pub fn private_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Writes `contents` to a new or truncated file with mode 0600.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(contents)?;
    tighten(path, FILE_MODE)
}

/// A SQLite database: creates the file 0600 before SQLite opens it (SQLite then gives its `-wal`
/// and `-shm` files the database's mode), and tightens an existing file and its companions.
pub fn private_sqlite(path: &Path) -> io::Result<()> {
    private_file_options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let file = Path::new(&name);
        if file.exists() {
            tighten(file, FILE_MODE)?;
        }
    }
    Ok(())
}

/// Tightens an existing file to 0600 if it allows more.
pub fn restrict_file(path: &Path) -> io::Result<()> {
    tighten(path, FILE_MODE)
}

/// Sets `mode` when the path allows more than it.
fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    let current = fs::metadata(path)?.permissions().mode() & 0o777;
    if current & !mode != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn directories_and_files_are_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        let file = dir.join("key");
        write_private(&file, b"secret").unwrap();
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn loose_existing_files_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        fs::set_permissions(root.path(), fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(root.path()).unwrap();
        assert_eq!(mode(root.path()), 0o700);
        let db = root.path().join("x.db");
        fs::write(&db, b"").unwrap();
        fs::write(root.path().join("x.db-wal"), b"").unwrap();
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(root.path().join("x.db-wal"), fs::Permissions::from_mode(0o644)).unwrap();
        private_sqlite(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&root.path().join("x.db-wal")), 0o600);
    }
}

//! Firmware images on disk: `<data dir>/firmware/<tenant>/<id>.bin`.
//!
//! An upload is written to a temporary file in `<data dir>/firmware/tmp/` while its SHA-256 is
//! computed and its size checked against the limit, chunk by chunk as the body arrives, then
//! synced and renamed into place: an image is never whole in memory, and a half-written one is
//! never visible. Downloads read byte ranges (HTTP Range) so an interrupted one resumes.

use std::io;
use std::path::{Path, PathBuf};

use drover_actors::TenantId;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

#[derive(Debug, Clone)]
pub struct FirmwareFiles {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("firmware storage: {0}")]
    Io(#[from] io::Error),
}

impl FirmwareFiles {
    pub fn new(data_dir: &Path) -> FirmwareFiles {
        FirmwareFiles {
            root: data_dir.join("firmware"),
        }
    }

    /// Where an image lives.
    pub fn path(&self, tenant: &TenantId, id: &str) -> PathBuf {
        self.root.join(tenant.as_str()).join(format!("{id}.bin"))
    }

    /// Starts writing an upload of at most `limit` bytes.
    pub async fn begin(&self, limit: u64) -> Result<ImageWriter, ImageError> {
        let dir = self.root.join("tmp");
        tokio::fs::create_dir_all(&dir).await?;
        let path = dir.join(format!("{}.part", uuid::Uuid::new_v4()));
        let file = tokio::fs::File::create(&path).await?;
        Ok(ImageWriter {
            file: Some(file),
            path,
            hasher: Sha256::new(),
            size: 0,
            limit,
        })
    }

    /// Removes an image's bytes (a missing file is fine: the record is what counts).
    pub async fn remove(&self, tenant: &TenantId, id: &str) -> io::Result<()> {
        match tokio::fs::remove_file(self.path(tenant, id)).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// An upload being written. Dropped without [`ImageWriter::finish`], its file is removed.
pub struct ImageWriter {
    file: Option<tokio::fs::File>,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

/// What a finished upload measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenImage {
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

impl ImageWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(ImageError::TooLarge { limit: self.limit });
        }
        self.hasher.update(chunk);
        match self.file.as_mut() {
            Some(file) => Ok(file.write_all(chunk).await?),
            None => Err(ImageError::Io(io::Error::other("upload already finished"))),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Syncs the file and moves it to `dest`.
    pub async fn finish(mut self, dest: &Path) -> Result<WrittenImage, ImageError> {
        let Some(mut file) = self.file.take() else {
            return Err(ImageError::Io(io::Error::other("upload already finished")));
        };
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        if let Some(dir) = dest.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        tokio::fs::rename(&self.path, dest).await?;
        let written = WrittenImage {
            size: self.size,
            sha256: hex::encode(std::mem::take(&mut self.hasher).finalize()),
        };
        // Renamed: nothing to clean up.
        self.path = PathBuf::new();
        Ok(written)
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An HTTP `Range` header that cannot be served (416).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsatisfiable;

/// The byte range (inclusive) a `Range` header asks of a `size`-byte image, or `None` for the
/// whole image. Only single `bytes=` ranges are served; a header this does not understand
/// (another unit, several ranges) is ignored as RFC 9110 §14.2 allows.
pub fn parse_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        // The last `end` bytes.
        let Ok(suffix) = end.parse::<u64>() else {
            return Ok(None);
        };
        if suffix == 0 || size == 0 {
            return Err(Unsatisfiable);
        }
        (size.saturating_sub(suffix), size - 1)
    } else {
        let Ok(start) = start.parse::<u64>() else {
            return Ok(None);
        };
        if start >= size {
            return Err(Unsatisfiable);
        }
        let end = if end.is_empty() {
            size - 1
        } else {
            match end.parse::<u64>() {
                Ok(end) if end >= start => end.min(size - 1),
                _ => return Ok(None),
            }
        };
        (start, end)
    };
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000), Ok(Some((0, 99))));
        assert_eq!(parse_range("bytes=500-", 1000), Ok(Some((500, 999))));
        assert_eq!(parse_range("bytes=-100", 1000), Ok(Some((900, 999))));
        assert_eq!(parse_range("bytes=900-5000", 1000), Ok(Some((900, 999))));
        assert_eq!(parse_range("bytes=1000-", 1000), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=-0", 1000), Err(Unsatisfiable));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Ok(None));
        assert_eq!(parse_range("items=0-1", 1000), Ok(None));
        assert_eq!(parse_range("bytes=9-3", 1000), Ok(None));
    }

    #[tokio::test]
    async fn an_upload_is_measured_limited_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let files = FirmwareFiles::new(dir.path());
        let tenant = TenantId::parse("acme").unwrap();
        let mut writer = files.begin(10).await.unwrap();
        writer.write(b"hello").await.unwrap();
        let written = writer.finish(&files.path(&tenant, "fw1")).await.unwrap();
        assert_eq!(written.size, 5);
        assert_eq!(
            written.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(std::fs::read(files.path(&tenant, "fw1")).unwrap(), b"hello");

        let mut writer = files.begin(4).await.unwrap();
        assert!(matches!(
            writer.write(b"hello").await,
            Err(ImageError::TooLarge { limit: 4 })
        ));
        drop(writer);
        let leftovers = std::fs::read_dir(dir.path().join("firmware/tmp"))
            .unwrap()
            .count();
        assert_eq!(leftovers, 0);
    }
}

//! The registry database connection: one diesel code path for SQLite and PostgreSQL.
//!
//! `DbConnection` is a diesel `MultiConnection` over both backends, so every query in
//! [`super::registry`] is written once. Connections come from an r2d2 pool and queries run on
//! tokio's blocking pool, never on an actix worker thread. SQLite writes are serialised in process
//! (one writer at a time is all SQLite allows; waiting on a mutex is cheaper and fairer than
//! retrying `SQLITE_BUSY`).

use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{self, ManageConnection, R2D2Connection};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::config::{DatabaseTarget, mask_url};

pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("schema/sqlite");
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("schema/postgres");

#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgresql(diesel::PgConnection),
    Sqlite(diesel::SqliteConnection),
}

/// Errors of the storage layer, classified for the API (a unique violation is a conflict, a
/// pool timeout means the database is unavailable).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    /// A unique key is taken (duplicate id or name).
    #[error("{0}")]
    AlreadyExists(String),
    /// The change conflicts with the current state (e.g. removing the last admin).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    LimitReached(String),
    /// The change would leave a record breaking a rule (checked inside the transaction).
    #[error("{0}")]
    Invalid(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether retrying the same operation later could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<DieselError> for StoreError {
    fn from(e: DieselError) -> Self {
        match &e {
            DieselError::NotFound => StoreError::NotFound("record".into()),
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::AlreadyExists(format!("already exists ({})", info.message()))
            }
            DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, info) => {
                StoreError::NotFound(format!("referenced record ({})", info.message()))
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => {
                StoreError::Unavailable(e.to_string())
            }
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
                if info.message().contains("database is locked") =>
            {
                StoreError::Unavailable(e.to_string())
            }
            _ => StoreError::Internal(e.to_string()),
        }
    }
}

impl From<r2d2::PoolError> for StoreError {
    fn from(e: r2d2::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Which backend a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// r2d2 manager that opens exactly the backend configured. (diesel's derived `establish` tries
/// each backend in turn, which would turn an unreachable PostgreSQL URL into a SQLite file.)
#[derive(Debug)]
pub struct DbManager {
    target: DatabaseTarget,
}

impl ManageConnection for DbManager {
    type Connection = DbConnection;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<DbConnection, r2d2::Error> {
        match &self.target {
            DatabaseTarget::Postgres(url) => diesel::PgConnection::establish(url)
                .map(DbConnection::Postgresql)
                .map_err(r2d2::Error::ConnectionError),
            DatabaseTarget::Sqlite(path) => {
                let mut conn = diesel::SqliteConnection::establish(&path.to_string_lossy())
                    .map_err(r2d2::Error::ConnectionError)?;
                // WAL lets readers run beside the writer; foreign keys are off by default in SQLite.
                conn.batch_execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                )
                .map_err(r2d2::Error::QueryError)?;
                Ok(DbConnection::Sqlite(conn))
            }
        }
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), r2d2::Error> {
        conn.ping().map_err(r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut DbConnection) -> bool {
        conn.is_broken()
    }
}

/// A pool of registry connections plus what is needed to use it well.
#[derive(Clone)]
pub struct Database {
    pool: r2d2::Pool<DbManager>,
    backend: Backend,
    write_lock: Arc<std::sync::Mutex<()>>,
    description: String,
}

impl Database {
    /// Opens the pool (creating the SQLite file and its directory if needed). Does not migrate.
    pub fn open(target: &DatabaseTarget, pool_size: u32) -> Result<Database, StoreError> {
        let (backend, description, default_size) = match target {
            DatabaseTarget::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    super::files::private_dir(dir).map_err(|e| {
                        StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                super::files::private_sqlite(path)
                    .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", path.display())))?;
                (Backend::Sqlite, format!("sqlite:{}", path.display()), 8)
            }
            DatabaseTarget::Postgres(url) => (Backend::Postgres, mask_url(url), 16),
        };
        let size = if pool_size == 0 { default_size } else { pool_size };
        let pool = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(5))
            .build(DbManager {
                target: target.clone(),
            })
            .map_err(|e| StoreError::Unavailable(format!("{description}: {e}")))?;
        Ok(Database {
            pool,
            backend,
            write_lock: Arc::new(std::sync::Mutex::new(())),
            description,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where the database is, with any password masked.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Applies pending migrations; returns the names of those applied.
    pub fn migrate(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.pool.get()?;
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let applied = match &mut *conn {
            DbConnection::Sqlite(c) => c
                .run_pending_migrations(SQLITE_MIGRATIONS)
                .map(|v| v.iter().map(|m| m.to_string()).collect::<Vec<_>>()),
            DbConnection::Postgresql(c) => {
                // Several nodes may start at once: only one migrates, the others wait for it.
                c.batch_execute("SELECT pg_advisory_lock(4242001)")
                    .map_err(StoreError::from)?;
                let result = c
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|v| v.iter().map(|m| m.to_string()).collect::<Vec<_>>());
                c.batch_execute("SELECT pg_advisory_unlock(4242001)")
                    .map_err(StoreError::from)?;
                result
            }
        };
        applied.map_err(|e| StoreError::Internal(format!("migration failed: {e}")))
    }

    /// Runs read-only work on the blocking pool.
    pub async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            work(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("registry task failed: {e}")))?
    }

    /// Runs `work` in a transaction on the blocking pool; on SQLite, one writer at a time.
    pub async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let lock = (self.backend == Backend::Sqlite).then(|| self.write_lock.clone());
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            let _guard = lock.as_ref().map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
            let conn: &mut DbConnection = &mut conn;
            conn.transaction(work)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("registry task failed: {e}")))?
    }

    /// Round trip to the database, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| conn.ping().map_err(StoreError::from)).await
    }
}

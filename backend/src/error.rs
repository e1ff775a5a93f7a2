//! The crate's one error type, and how each variant is shown to a client.

use replichat_shared::ErrorCode;

/// Everything that can go wrong in the server. Variants above `Db` are the client's doing and are reported
/// to it as they are; the rest are internal and reported only as [`ErrorCode::Internal`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("this request needs a session: register, login or resume first")]
    Unauthenticated,
    #[error("this socket already has a session")]
    AlreadyAuthenticated,
    #[error("invalid username: {0}")]
    InvalidUsername(&'static str),
    #[error("the password must have 8 to 1024 characters")]
    WeakPassword,
    #[error("that username is taken")]
    UsernameTaken,
    #[error("wrong username or password")]
    BadCredentials,
    #[error("no account named {0:?}")]
    UnknownUser(String),
    #[error("you cannot send a message to yourself")]
    SelfSend,
    #[error("{0}")]
    TooLong(&'static str),
    /// Too many attempts: `what` names the limit, `retry_after` how long to wait.
    #[error("too many {what}; try again in {} s", retry_after.as_secs_f64().ceil().max(1.0))]
    RateLimited { what: &'static str, retry_after: std::time::Duration },
    #[error("this replica cannot serve that now (it is not the primary, or could not commit in time); nothing was acknowledged: retry, on the primary")]
    Unavailable,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is not what this version expects: {0}")]
    Corrupt(String),
    #[error("password hashing: {0}")]
    Hash(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A committed entry that cannot be applied: a bug (or a foreign writer), never a passing condition.
    /// The replica stops rather than retry it for ever (docs/ARCHITECTURE.md, "An entry that cannot be applied").
    #[error("committed entry {index} cannot be applied: {reason}")]
    Unapplicable { index: u64, reason: String },
    /// The replica stopped itself; the reason says why and what the operator can do.
    #[error("the replica stopped: {0}")]
    Stopped(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable code a client sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::BadRequest(_) => ErrorCode::BadRequest,
            Error::Unauthenticated => ErrorCode::Unauthenticated,
            Error::AlreadyAuthenticated => ErrorCode::AlreadyAuthenticated,
            Error::InvalidUsername(_) => ErrorCode::InvalidUsername,
            Error::WeakPassword => ErrorCode::WeakPassword,
            Error::UsernameTaken => ErrorCode::UsernameTaken,
            Error::BadCredentials => ErrorCode::BadCredentials,
            Error::UnknownUser(_) => ErrorCode::UnknownUser,
            Error::SelfSend => ErrorCode::SelfSend,
            Error::TooLong(_) => ErrorCode::TooLong,
            Error::RateLimited { .. } => ErrorCode::RateLimited,
            Error::Unavailable => ErrorCode::Unavailable,
            Error::Db(_)
            | Error::Sqlite(_)
            | Error::Migrate(_)
            | Error::Corrupt(_)
            | Error::Hash(_)
            | Error::Io(_)
            | Error::Unapplicable { .. }
            | Error::Stopped(_) => ErrorCode::Internal,
        }
    }

    /// Whether this error says something about the data rather than about the machine: an op that breaks
    /// a constraint or holds a value the engine refuses fails the same way every time it is retried, while
    /// a full disk, a lost connection or a lock timeout may pass.
    pub fn is_deterministic(&self) -> bool {
        match self {
            Error::Corrupt(_) | Error::Unapplicable { .. } => true,
            Error::Db(sqlx::Error::Database(e)) => {
                let code = e.code().unwrap_or_default();
                if code.len() == 5 {
                    // A PostgreSQL SQLSTATE: class 22 is a data exception, 23 an integrity constraint violation.
                    code.starts_with("22") || code.starts_with("23")
                } else {
                    // A SQLite result code (extended; the primary code is the low byte): TOOBIG, CONSTRAINT,
                    // MISMATCH, RANGE.
                    matches!(code.parse::<u32>().map(|c| c & 0xff), Ok(18 | 19 | 20 | 25))
                }
            }
            Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(e.extended_code & 0xff, 18 | 19 | 20 | 25)
            }
            Error::Sqlite(
                rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::InvalidColumnType(..)
                | rusqlite::Error::IntegralValueOutOfRange(..),
            ) => true,
            Error::Db(sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::TypeNotFound { .. }) => {
                true
            }
            _ => false,
        }
    }

    /// Whether this error is the storage's: the database (either SQL layer) or the file system failed, so the
    /// replica's disk may be full or failing.
    pub fn is_storage(&self) -> bool {
        matches!(self, Error::Db(_) | Error::Sqlite(_) | Error::Io(_))
    }

    /// For `rate_limited`: how long the client should wait, in milliseconds (at least 1).
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Error::RateLimited { retry_after, .. } => Some((retry_after.as_millis() as u64).max(1)),
            _ => None,
        }
    }

    /// The text a client sees: the error itself for client errors, nothing internal otherwise.
    pub fn client_message(&self) -> String {
        match self.code() {
            ErrorCode::Internal => "internal error; nothing was changed, try again".to_owned(),
            _ => self.to_string(),
        }
    }
}

//! `postlog verify` for the PostgreSQL + S3 backend.

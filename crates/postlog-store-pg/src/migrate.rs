//! `postlog migrate`: an embedded data directory into PostgreSQL + S3.
pub struct MigrateReport;
pub struct MigrateProgress;

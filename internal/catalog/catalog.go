// Package catalog owns shadowctl's persisted state in the database: the catalog
// schema (default "shadowctl"), its versioned creation and upgrades, and the
// low-level reads and writes of migrations, copy checkpoints and the event log.
// It does not decide anything: the shadow package drives phases, this package
// only stores what they decided.
package catalog

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// DefaultSchema is where the catalog lives unless the operator names another.
const DefaultSchema = "shadowctl"

// ErrNoCatalog means the catalog schema has not been created yet.
var ErrNoCatalog = errors.New("the shadowctl catalog does not exist (run `shadowctl init`)")

// ErrNewerCatalog means the catalog was created by a newer shadowctl.
var ErrNewerCatalog = errors.New("the catalog was written by a newer shadowctl; upgrade this binary")

// Catalog names the catalog schema; every query qualifies its tables with it.
type Catalog struct {
	Schema string
}

// New returns a catalog in schema (DefaultSchema when empty).
func New(schema string) Catalog {
	if schema == "" {
		schema = DefaultSchema
	}
	return Catalog{Schema: schema}
}

// T returns the quoted, schema-qualified name of a catalog table.
func (c Catalog) T(table string) string {
	return pgsql.QualifiedName{Schema: c.Schema, Name: table}.Quoted()
}

// steps are the catalog's versions: step i brings version i to i+1. Append
// only; never edit a step that has shipped.
func (c Catalog) steps() []string {
	s := pgsql.Ident(c.Schema)
	return []string{
		// 1: migrations, copy checkpoints, events.
		`CREATE TABLE ` + s + `.migrations (
			id               text PRIMARY KEY,
			table_schema     text NOT NULL,
			table_name       text NOT NULL,
			green_schema     text NOT NULL,
			sync_mode        text NOT NULL DEFAULT 'trigger',
			spec             jsonb NOT NULL,
			phase            text NOT NULL,
			paused           boolean NOT NULL DEFAULT false,
			error            text,
			state            jsonb NOT NULL DEFAULT '{}',
			rows_estimated   bigint NOT NULL DEFAULT 0,
			rows_copied      bigint NOT NULL DEFAULT 0,
			verify           jsonb,
			created_at       timestamptz NOT NULL DEFAULT now(),
			updated_at       timestamptz NOT NULL DEFAULT now(),
			phase_changed_at timestamptz NOT NULL DEFAULT now(),
			cut_over_at      timestamptz,
			requested_by     text NOT NULL DEFAULT current_user
		);
		CREATE UNIQUE INDEX migrations_one_active_per_table ON ` + s + `.migrations (table_schema, table_name)
			WHERE phase NOT IN ('aborted', 'finalized');
		CREATE TABLE ` + s + `.copy_ranges (
			migration_id text NOT NULL REFERENCES ` + s + `.migrations ON DELETE CASCADE,
			range_no     int NOT NULL,
			lower_key    text[],
			upper_key    text[],
			last_key     text[],
			done         boolean NOT NULL DEFAULT false,
			rows_copied  bigint NOT NULL DEFAULT 0,
			updated_at   timestamptz NOT NULL DEFAULT now(),
			PRIMARY KEY (migration_id, range_no)
		);
		CREATE TABLE ` + s + `.events (
			id           bigserial PRIMARY KEY,
			migration_id text,
			at           timestamptz NOT NULL DEFAULT clock_timestamp(),
			actor        text NOT NULL DEFAULT current_user,
			kind         text NOT NULL,
			message      text NOT NULL,
			data         jsonb
		);
		CREATE INDEX events_by_migration ON ` + s + `.events (migration_id, id);`,
		// 2: checkpoints of batched UPDATE backfills (expand/contract).
		`CREATE TABLE ` + s + `.backfills (
			id            text PRIMARY KEY,
			table_schema  text NOT NULL,
			table_name    text NOT NULL,
			spec          jsonb NOT NULL,
			last_key      text[],
			rows_changed  bigint NOT NULL DEFAULT 0,
			done          boolean NOT NULL DEFAULT false,
			error         text,
			created_at    timestamptz NOT NULL DEFAULT now(),
			updated_at    timestamptz NOT NULL DEFAULT now()
		);`,
		// 3: logical sync positions: the last WAL position applied to green,
		// written in the same transaction as the changes it covers.
		`CREATE TABLE ` + s + `.sync_positions (
			migration_id text PRIMARY KEY REFERENCES ` + s + `.migrations ON DELETE CASCADE,
			slot_name    text NOT NULL,
			applied_lsn  pg_lsn NOT NULL,
			applied_at   timestamptz,
			updated_at   timestamptz NOT NULL DEFAULT now()
		);`,
		// 3 (daemon control plane): which daemon drives a migration, why its
		// copy is throttled, whether an automatic cutover is held back, and
		// up to which event its hooks have run.
		`ALTER TABLE ` + s + `.migrations
			ADD COLUMN driver       jsonb,
			ADD COLUMN throttled    text,
			ADD COLUMN cutover_held boolean NOT NULL DEFAULT false,
			ADD COLUMN hooks_done   bigint NOT NULL DEFAULT 0;`,
	}
}

// Version is the catalog version this binary writes.
func (c Catalog) Version() int { return len(c.steps()) }

// Init creates or upgrades the catalog. It is idempotent and safe when run
// concurrently: the work happens in one transaction under a transaction-level
// advisory lock derived from the schema name. It returns the version before
// and after.
func (c Catalog) Init(ctx context.Context, db interface {
	Begin(context.Context) (pgx.Tx, error)
}) (from, to int, err error) {
	tx, err := db.Begin(ctx)
	if err != nil {
		return 0, 0, fmt.Errorf("catalog init: %w", err)
	}
	defer tx.Rollback(ctx)
	// Serialise concurrent inits of the same catalog; released at commit.
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('shadowctl.catalog:' || $1, 0))`, c.Schema); err != nil {
		return 0, 0, fmt.Errorf("catalog init: lock: %w", err)
	}
	if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgsql.Ident(c.Schema)); err != nil {
		return 0, 0, fmt.Errorf("catalog init: create schema %s: %w", c.Schema, err)
	}
	if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+c.T("schema_version")+` (
		version int NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return 0, 0, fmt.Errorf("catalog init: %w", err)
	}
	if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM `+c.T("schema_version")).Scan(&from); err != nil {
		return 0, 0, fmt.Errorf("catalog init: read version: %w", err)
	}
	steps := c.steps()
	if from > len(steps) {
		return from, from, fmt.Errorf("catalog %s is at version %d, this binary knows %d: %w", c.Schema, from, len(steps), ErrNewerCatalog)
	}
	for v := from; v < len(steps); v++ {
		if _, err := tx.Exec(ctx, steps[v]); err != nil {
			return from, v, fmt.Errorf("catalog init: step %d: %w", v+1, err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+c.T("schema_version")+` (version) VALUES ($1)`, v+1); err != nil {
			return from, v, fmt.Errorf("catalog init: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return from, from, fmt.Errorf("catalog init: commit: %w", err)
	}
	return from, len(steps), nil
}

// Check reports ErrNoCatalog or ErrNewerCatalog when the catalog cannot be
// used as it is.
func (c Catalog) Check(ctx context.Context, q pgsql.Querier) error {
	var v *int
	err := q.QueryRow(ctx, `SELECT CASE WHEN to_regclass($1) IS NULL THEN NULL
		ELSE 0 END`, c.T("schema_version")).Scan(&v)
	if err != nil {
		return fmt.Errorf("catalog check: %w", err)
	}
	if v == nil {
		return ErrNoCatalog
	}
	var version int
	if err := q.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM `+c.T("schema_version")).Scan(&version); err != nil {
		return fmt.Errorf("catalog check: %w", err)
	}
	if version > c.Version() {
		return ErrNewerCatalog
	}
	if version < c.Version() {
		return fmt.Errorf("catalog %s is at version %d, this binary needs %d (run `shadowctl init`): %w", c.Schema, version, c.Version(), ErrNoCatalog)
	}
	return nil
}

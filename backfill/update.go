// Package backfill owns batched data movement: the chunked copy blue→green of
// a shadow migration, and (this file and update_*.go) the batched UPDATE
// backfills of expand/contract migrations behind `shadowctl backfill`:
// keyset batches by the table's key, each its own short transaction under
// lock_timeout with retries, an adaptive batch size, throttling, progress and
// a checkpoint in the catalog's backfills table so a rerun resumes. It does
// not decide what to backfill: the SET/FROM/WHERE expressions are the
// operator's SQL, passed through as written.
package backfill

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Operator-facing conditions.
var (
	// ErrNoKey means the table has neither a primary key nor a unique index
	// on NOT NULL columns (without expressions or predicate) to page by.
	ErrNoKey = errors.New("table has no primary key or unique NOT NULL index to page by")
	// ErrNoTable means the table does not exist (or is not a table).
	ErrNoTable = errors.New("no such table")
	// ErrRunning means another session runs the same backfill right now.
	ErrRunning = errors.New("this backfill is already running in another session")
	// ErrRetriesExhausted means a batch kept failing on lock timeouts
	// (deadlocks, serialization failures) until the retries ran out.
	ErrRetriesExhausted = errors.New("retries exhausted")
	// ErrBadSpec means the operator's arguments cannot make a backfill.
	ErrBadSpec = errors.New("bad backfill arguments")
)

// Update is what a batched UPDATE backfill does. Set, From and Where are
// operator SQL; Table and OnlyNull are names (quoted by this package).
type Update struct {
	Table    string // [schema.]table as the operator wrote it
	Set      string // e.g. "customer_email = customers.email"
	From     string // optional extra FROM list, e.g. "customers"
	Where    string // optional predicate, e.g. "orders.customer_id = customers.id"
	OnlyNull string // optional column: only rows where it IS NULL (re-checked under the row lock)
}

// UpdateOptions tune how it runs; they are not part of its identity.
type UpdateOptions struct {
	// MaxBatch is the largest batch (default 5000); the batch size adapts
	// to TargetBatchTime below it.
	MaxBatch int
	// TargetBatchTime is how long one batch should take (default 200ms).
	TargetBatchTime time.Duration
	// MaxRowsPerSecond throttles rows changed per second (0: no limit).
	MaxRowsPerSecond float64
	// LockTimeout bounds each batch's lock waits (default 1s).
	LockTimeout time.Duration
	// Retries per batch after lock timeouts, deadlocks, serialization
	// failures (default 10).
	Retries int
	// ProgressEvery is how often progress is logged (default 10s).
	ProgressEvery time.Duration
	// Restart forgets a previous run's checkpoint (done or not).
	Restart bool
	Log     zerolog.Logger
}

func (o *UpdateOptions) defaults() {
	if o.MaxBatch <= 0 {
		o.MaxBatch = 5000
	}
	if o.TargetBatchTime <= 0 {
		o.TargetBatchTime = 200 * time.Millisecond
	}
	if o.LockTimeout <= 0 {
		o.LockTimeout = time.Second
	}
	if o.Retries < 0 {
		o.Retries = 0
	}
	if o.ProgressEvery <= 0 {
		o.ProgressEvery = 10 * time.Second
	}
}

// UpdateResult sums up a run.
type UpdateResult struct {
	ID          string
	Table       string
	RowsChanged int64 // over all runs of this backfill
	RowsThisRun int64
	Batches     int
	Resumed     bool // a checkpoint from an earlier run was used
	AlreadyDone bool // an earlier run had finished; nothing was done
	LastKey     []string
	Took        time.Duration
}

// table is the resolved target and its key.
type table struct {
	name     pgsql.QualifiedName
	key      []string // key column names
	keyTypes []string // their types, as format_type gives them
	keyIndex string
}

func normalize(sql string) string { return strings.Join(strings.Fields(sql), " ") }

// spec is what the checkpoint row stores (and what the id hashes, minus
// the bounds).
type spec struct {
	Version  int      `json:"version"`
	Schema   string   `json:"schema"`
	Table    string   `json:"table"`
	Set      string   `json:"set"`
	From     string   `json:"from,omitempty"`
	Where    string   `json:"where,omitempty"`
	OnlyNull string   `json:"only_null,omitempty"`
	Key      []string `json:"key,omitempty"`
	UpperKey []string `json:"upper_key,omitempty"`
	LowerKey []string `json:"lower_key,omitempty"`
	Estimate int64    `json:"estimate,omitempty"`
}

// id is the hash of the normalized arguments: the same backfill asked again
// (whatever the white space, batch size or throttle) has the same id.
func (s spec) id() string {
	h := sha256.New()
	for _, p := range []string{"v1", s.Schema, s.Table, s.Set, s.From, s.Where, s.OnlyNull} {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return "bf_" + hex.EncodeToString(h.Sum(nil))[:16]
}

// resolve finds the table and the key to page by.
func resolve(ctx context.Context, conn *pgx.Conn, u Update) (table, error) {
	var t table
	parts, err := pgsql.ParseName(u.Table)
	if err != nil || len(parts) > 2 {
		return t, fmt.Errorf("--table %q: %w", u.Table, ErrBadSpec)
	}
	var oid uint32
	var kind string
	err = conn.QueryRow(ctx, `SELECT c.oid, n.nspname, c.relname, c.relkind::text
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)`,
		pgx.Identifier(parts).Sanitize()).Scan(&oid, &t.name.Schema, &t.name.Name, &kind)
	if errors.Is(err, pgx.ErrNoRows) {
		return t, fmt.Errorf("%s: %w", pgx.Identifier(parts).Sanitize(), ErrNoTable)
	}
	if err != nil {
		return t, fmt.Errorf("resolve table %s: %w", u.Table, err)
	}
	if kind != "r" && kind != "p" {
		return t, fmt.Errorf("%s is not a table (relkind %s): %w", t.name, kind, ErrNoTable)
	}
	err = conn.QueryRow(ctx, `SELECT i.indexrelid::regclass::text,
			array_agg(a.attname::text ORDER BY k.ord), array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
		FROM pg_index i
		CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
		  AND k.ord <= i.indnkeyatts
		GROUP BY i.indexrelid, i.indisprimary
		HAVING bool_and(a.attnotnull)
		ORDER BY i.indisprimary DESC, count(*), i.indexrelid
		LIMIT 1`, oid).Scan(&t.keyIndex, &t.key, &t.keyTypes)
	if errors.Is(err, pgx.ErrNoRows) {
		return t, fmt.Errorf("%s: %w", t.name, ErrNoKey)
	}
	if err != nil {
		return t, fmt.Errorf("find the key of %s: %w", t.name, err)
	}
	if u.OnlyNull != "" {
		var ok bool
		if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = $1 AND attname = $2
			AND attnum > 0 AND NOT attisdropped)`, oid, u.OnlyNull).Scan(&ok); err != nil {
			return t, fmt.Errorf("check --only-null column: %w", err)
		}
		if !ok {
			return t, fmt.Errorf("--only-null %q: %s has no such column: %w", u.OnlyNull, t.name, ErrBadSpec)
		}
	}
	return t, nil
}

// The statements, built once from quoted names and the operator's SQL.
type statements struct {
	first, next string // batch without / with a lower bound
	keyCols     []string
}

func (t table) cols(prefix string) string {
	var b []string
	for _, k := range t.key {
		b = append(b, prefix+pgsql.Ident(k))
	}
	return strings.Join(b, ", ")
}

// params renders ($i::text::type, ...) from position start.
func (t table) params(start int) string {
	var b []string
	for i, typ := range t.keyTypes {
		b = append(b, fmt.Sprintf("$%d::text::%s", start+i, typ))
	}
	return "(" + strings.Join(b, ", ") + ")"
}

func build(t table, u Update, bounded bool) statements {
	const batch = `"shadowctl_batch"`
	n := len(t.key)
	tbl := t.name.Quoted()
	keyRow := "(" + t.cols("") + ")"
	order := t.cols("")
	var desc []string
	var texts []string
	for _, k := range t.key {
		desc = append(desc, batch+"."+pgsql.Ident(k)+" DESC")
		texts = append(texts, batch+"."+pgsql.Ident(k)+"::text")
	}
	mk := func(lower bool) string {
		// $1 = limit, then the upper key (when bounded), then the lower key.
		var preds []string
		p := 2
		if bounded {
			preds = append(preds, keyRow+" <= "+t.params(p))
			p += n
		}
		if lower {
			preds = append(preds, keyRow+" > "+t.params(p))
		}
		if u.OnlyNull != "" {
			preds = append(preds, pgsql.Ident(u.OnlyNull)+" IS NULL")
		}
		where := ""
		if len(preds) > 0 {
			where = " WHERE " + strings.Join(preds, " AND ")
		}
		from := batch
		if strings.TrimSpace(u.From) != "" {
			from += ", " + u.From
		}
		var join []string
		for _, k := range t.key {
			join = append(join, tbl+"."+pgsql.Ident(k)+" = "+batch+"."+pgsql.Ident(k))
		}
		if strings.TrimSpace(u.Where) != "" {
			join = append(join, "("+u.Where+")")
		}
		if u.OnlyNull != "" {
			join = append(join, tbl+"."+pgsql.Ident(u.OnlyNull)+" IS NULL")
		}
		return "WITH " + batch + " AS (SELECT " + t.cols("") + " FROM " + tbl + where +
			" ORDER BY " + order + " LIMIT $1),\n" +
			`"shadowctl_updated" AS (UPDATE ` + tbl + " SET " + u.Set + "\nFROM " + from +
			"\nWHERE " + strings.Join(join, " AND ") + " RETURNING 1)\n" +
			"SELECT (SELECT count(*) FROM " + batch + `), (SELECT count(*) FROM "shadowctl_updated"), ` +
			"(SELECT ARRAY[" + strings.Join(texts, ", ") + "] FROM " + batch + " ORDER BY " + strings.Join(desc, ", ") + " LIMIT 1)"
	}
	return statements{first: mk(false), next: mk(true), keyCols: t.key}
}

// ID returns the backfill's id (resolving the table to normalize its name).
func (u Update) ID(ctx context.Context, conn *pgx.Conn) (string, error) {
	u, err := u.canonical()
	if err != nil {
		return "", err
	}
	t, err := resolve(ctx, conn, u)
	if err != nil {
		return "", err
	}
	return u.spec(t).id(), nil
}

func (u Update) spec(t table) spec {
	return spec{Version: 1, Schema: t.name.Schema, Table: t.name.Name, Set: normalize(u.Set),
		From: normalize(u.From), Where: normalize(u.Where), OnlyNull: u.OnlyNull, Key: t.key}
}

// canonical validates u and folds --only-null like SQL does (unquoted:
// lower case; "Quoted": as written).
func (u Update) canonical() (Update, error) {
	if err := u.validate(); err != nil {
		return u, err
	}
	if u.OnlyNull != "" {
		parts, err := pgsql.ParseName(u.OnlyNull)
		if err != nil || len(parts) != 1 {
			return u, fmt.Errorf("--only-null %q: want one column name: %w", u.OnlyNull, ErrBadSpec)
		}
		u.OnlyNull = parts[0]
	}
	return u, nil
}

func (u Update) validate() error {
	if strings.TrimSpace(u.Table) == "" || strings.TrimSpace(u.Set) == "" {
		return fmt.Errorf("--table and --set are required: %w", ErrBadSpec)
	}
	// The generated statement goes through the extended protocol, which
	// refuses more than one statement: a stray semicolon cannot smuggle a
	// second one in.
	return nil
}

// marshal is json.Marshal for the spec (cannot fail for these types).
func (s spec) marshal() []byte {
	b, _ := json.Marshal(s)
	return b
}

// checkpointTable is the catalog's backfills table.
func checkpointTable(cat catalog.Catalog) string { return cat.T("backfills") }

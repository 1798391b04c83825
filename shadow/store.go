package shadow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Store errors.
var (
	ErrNotFound   = errors.New("no such migration")
	ErrTableBusy  = errors.New("another migration is active on this table")
	ErrWrongPhase = errors.New("the migration is not in a phase that allows this")
	ErrIDTaken    = errors.New("a migration with this id exists")
)

// NotifyChannel is where phase changes are announced (payload: migration id).
const NotifyChannel = "shadowctl"

// Migration is one row of the catalog's migrations table.
type Migration struct {
	ID             string
	Table          pgsql.QualifiedName
	GreenSchema    string
	Sync           SyncMode
	Request        Request
	Phase          Phase
	Paused         bool
	Error          string
	State          State
	RowsEstimated  int64
	RowsCopied     int64
	Verify         json.RawMessage
	CreatedAt      time.Time
	UpdatedAt      time.Time
	PhaseChangedAt time.Time
	CutOverAt      *time.Time
	RequestedBy    string
	// Driver is the daemon that drives (or last drove) it (a DriverInfo).
	Driver json.RawMessage
	// Throttled is why the copy waits ("" when it does not).
	Throttled string
	// CutoverHeld holds back an automatic or scheduled cutover (postpone).
	CutoverHeld bool
}

// State is the migration's persisted working state.
type State struct {
	Plan *Plan `json:"plan,omitempty"`
	// CreatedGreenSchema is true when the migration created the green schema
	// (and so removes it when it is empty at the end).
	CreatedGreenSchema bool `json:"created_green_schema,omitempty"`
	// IndexesBuilt is true once green's deferred indexes and constraints exist.
	IndexesBuilt bool `json:"indexes_built,omitempty"`
	// LastCutover describes the last swap attempt that succeeded.
	LastCutover *SwapRecord `json:"last_cutover,omitempty"`
	// Serving says which side serves the application: "blue" or "green".
	Serving string `json:"serving,omitempty"`
	// Slot and Publication name the logical sync's objects (logical mode,
	// until the first cutover; afterwards every sync is by triggers).
	Slot        string `json:"slot,omitempty"`
	Publication string `json:"publication,omitempty"`
	// LogicalDone is set once the logical sync has been replaced by triggers.
	LogicalDone bool `json:"logical_done,omitempty"`
}

// SwapRecord is one successful swap (cutover or rollback).
type SwapRecord struct {
	Kind       string    `json:"kind"`
	At         time.Time `json:"at"`
	Attempts   int       `json:"attempts"`
	LockWaitMS float64   `json:"lock_wait_ms"`
	LockHoldMS float64   `json:"lock_hold_ms"`
	// Logical sync only: the rounds of catching up before the lock, and how
	// long the catch-up under the lock took (part of the hold).
	DrainRounds        int     `json:"drain_rounds,omitempty"`
	CatchUpUnderLockMS float64 `json:"catch_up_under_lock_ms,omitempty"`
	// CommitMS is the part of the hold spent in COMMIT (the swap commits
	// without waiting for the WAL flush; the record of it made it durable).
	CommitMS float64 `json:"commit_ms"`
	// AfterCommitLSN: the WAL position the swap is durable at (flushed
	// before the record of it was, see cutover.SwapResult).
	AfterCommitLSN string `json:"after_commit_lsn,omitempty"`
}

// Summary is the swap's figures as operators read them in messages and
// status.
func (s SwapRecord) Summary() string {
	out := fmt.Sprintf("%d attempt(s), lock wait %.1f ms, hold %.1f ms", s.Attempts, s.LockWaitMS, s.LockHoldMS)
	if s.DrainRounds > 0 {
		out += fmt.Sprintf(" (green caught up in %d round(s) before the lock, %.1f ms under it)", s.DrainRounds, s.CatchUpUnderLockMS)
	}
	return out
}

// Store reads and writes migrations in the catalog.
type Store struct {
	Pool *pgxpool.Pool
	Cat  catalog.Catalog
}

const migrationCols = `id, table_schema, table_name, green_schema, sync_mode, spec, phase, paused, coalesce(error, ''),
	state, rows_estimated, (SELECT coalesce(sum(rows_copied), 0) FROM %s r WHERE r.migration_id = m.id), verify,
	created_at, updated_at, phase_changed_at, cut_over_at, requested_by, driver, coalesce(throttled, ''), cutover_held`

func (s *Store) scan(row pgx.Row) (*Migration, error) {
	m := &Migration{}
	var spec, state []byte
	var phase, sync string
	err := row.Scan(&m.ID, &m.Table.Schema, &m.Table.Name, &m.GreenSchema, &sync, &spec, &phase, &m.Paused, &m.Error,
		&state, &m.RowsEstimated, &m.RowsCopied, &m.Verify, &m.CreatedAt, &m.UpdatedAt, &m.PhaseChangedAt, &m.CutOverAt, &m.RequestedBy,
		&m.Driver, &m.Throttled, &m.CutoverHeld)
	if err != nil {
		return nil, err
	}
	m.Phase, m.Sync = Phase(phase), SyncMode(sync)
	if err := json.Unmarshal(spec, &m.Request); err != nil {
		return nil, fmt.Errorf("migration %s: bad spec in catalog: %w", m.ID, err)
	}
	if err := json.Unmarshal(state, &m.State); err != nil {
		return nil, fmt.Errorf("migration %s: bad state in catalog: %w", m.ID, err)
	}
	return m, nil
}

// Get reads one migration.
func (s *Store) Get(ctx context.Context, q pgsql.Querier, id string) (*Migration, error) {
	m, err := s.scan(q.QueryRow(ctx, fmt.Sprintf(`SELECT `+migrationCols+` FROM %s m WHERE id = $1`, s.Cat.T("copy_ranges"), s.Cat.T("migrations")), id))
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("migration %q: %w (see `shadowctl list`)", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("read migration %q: %w", id, err)
	}
	return m, nil
}

// List reads all migrations, newest first.
func (s *Store) List(ctx context.Context) ([]*Migration, error) {
	rows, err := s.Pool.Query(ctx, fmt.Sprintf(`SELECT `+migrationCols+` FROM %s m ORDER BY created_at DESC, id`, s.Cat.T("copy_ranges"), s.Cat.T("migrations")))
	if err != nil {
		return nil, fmt.Errorf("list migrations: %w", err)
	}
	defer rows.Close()
	var out []*Migration
	for rows.Next() {
		m, err := s.scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

// Create records a new migration in phase pending.
func (s *Store) Create(ctx context.Context, q pgsql.Querier, m *Migration) error {
	spec, err := json.Marshal(m.Request)
	if err != nil {
		return err
	}
	state, err := json.Marshal(m.State)
	if err != nil {
		return err
	}
	_, err = q.Exec(ctx, `INSERT INTO `+s.Cat.T("migrations")+` (id, table_schema, table_name, green_schema, sync_mode, spec, phase, state, rows_estimated)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
		m.ID, m.Table.Schema, m.Table.Name, m.GreenSchema, string(m.Sync), spec, string(Pending), state, m.RowsEstimated)
	if pgsql.Code(err) == pgsql.CodeUniqueViolation {
		if existing, gerr := s.activeOn(ctx, q, m.Table); gerr == nil && existing != "" && existing != m.ID {
			return fmt.Errorf("table %s: %w: %s (abort or finish it first)", m.Table, ErrTableBusy, existing)
		}
		return fmt.Errorf("migration %q: %w (choose another --name)", m.ID, ErrIDTaken)
	}
	if err != nil {
		return fmt.Errorf("record migration %s: %w", m.ID, err)
	}
	return s.Event(ctx, q, m.ID, "submitted", fmt.Sprintf("migration of %s submitted: %s", m.Table, m.Request.Alter), m.Request)
}

func (s *Store) activeOn(ctx context.Context, q pgsql.Querier, t pgsql.QualifiedName) (string, error) {
	var id string
	err := q.QueryRow(ctx, `SELECT id FROM `+s.Cat.T("migrations")+` WHERE table_schema = $1 AND table_name = $2 AND phase NOT IN ('aborted', 'finalized')`, t.Schema, t.Name).Scan(&id)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", nil
	}
	return id, err
}

// ActiveOn returns the id of the active migration of a table, or "".
func (s *Store) ActiveOn(ctx context.Context, t pgsql.QualifiedName) (string, error) {
	return s.activeOn(ctx, s.Pool, t)
}

// SetPhase moves a migration from one of the phases in from to phase to,
// records the event and announces it. It fails with ErrWrongPhase when the
// migration is elsewhere (someone else moved it).
func (s *Store) SetPhase(ctx context.Context, q pgsql.Querier, id string, from []Phase, to Phase, errMsg string) error {
	return s.setPhase(ctx, q, id, from, to, errMsg, nil)
}

func (s *Store) setPhase(ctx context.Context, q pgsql.Querier, id string, from []Phase, to Phase, errMsg string, state []byte) error {
	var prev string
	err := q.QueryRow(ctx, s.phaseChangeSQL(), id, string(to), errMsg, joinPhases(from), NotifyChannel, state).Scan(&prev, nil)
	if errors.Is(err, pgx.ErrNoRows) {
		return s.WrongPhase(ctx, q, id, from)
	}
	if err != nil {
		return fmt.Errorf("migration %s: set phase %s: %w", id, to, err)
	}
	return nil
}

// PhaseAndStateStatement is SetPhase that also writes the migration's
// working state, as a statement for a swap's pipeline
// (pgsql.ExecPipelinedThen): it returns one row when the phase moved, none
// when the migration was not in from (see WrongPhase).
func (s *Store) PhaseAndStateStatement(id string, from []Phase, to Phase, st State) (*pgsql.Statement, error) {
	b, err := json.Marshal(st)
	if err != nil {
		return nil, err
	}
	return &pgsql.Statement{SQL: s.phaseChangeSQL(), Args: [][]byte{
		[]byte(id), []byte(to), []byte(""), []byte(joinPhases(from)), []byte(NotifyChannel), b}}, nil
}

// WrongPhase is the error of a phase change that found the migration
// elsewhere than in from.
func (s *Store) WrongPhase(ctx context.Context, q pgsql.Querier, id string, from []Phase) error {
	cur, err := s.Get(ctx, q, id)
	if err != nil {
		return err
	}
	return fmt.Errorf("migration %s is %s, not %v: %w", id, cur.Phase, from, ErrWrongPhase)
}

func joinPhases(ps []Phase) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = string(p)
	}
	return strings.Join(s, ",")
}

// phaseChangeSQL moves a migration's phase, writes its state ($6, unless
// NULL), records the event and notifies, in one statement: swaps run it
// under a lock the application waits on, where every round trip counts.
// Its arguments: id, to, error message, the from phases joined by commas,
// the notification channel, the state.
func (s *Store) phaseChangeSQL() string {
	return `WITH changed AS (
			UPDATE ` + s.Cat.T("migrations") + ` m SET phase = $2, error = nullif($3, ''), state = coalesce($6::jsonb, state), updated_at = now(), phase_changed_at = now(),
				cut_over_at = CASE WHEN $2 = 'cut_over' AND m.phase = 'cutting_over' THEN now() ELSE cut_over_at END
			WHERE id = $1 AND phase = ANY(string_to_array($4, ','))
			RETURNING (SELECT phase FROM ` + s.Cat.T("migrations") + ` WHERE id = $1) AS prev
		), event AS (
			INSERT INTO ` + s.Cat.T("events") + ` (migration_id, kind, message, data)
			SELECT $1, 'phase', prev || ' → ' || $2 || coalesce(': ' || nullif($3, ''), ''), jsonb_build_object('from', prev, 'to', $2::text)
			  FROM changed
		)
		SELECT prev, pg_notify($5, $1) FROM changed`
}

// SaveState writes the migration's working state.
func (s *Store) SaveState(ctx context.Context, q pgsql.Querier, id string, st State) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	_, err = q.Exec(ctx, `UPDATE `+s.Cat.T("migrations")+` SET state = $2, updated_at = now() WHERE id = $1`, id, b)
	if err != nil {
		return fmt.Errorf("migration %s: save state: %w", id, err)
	}
	return nil
}

// SaveVerify records a verification result.
func (s *Store) SaveVerify(ctx context.Context, q pgsql.Querier, id string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = q.Exec(ctx, `UPDATE `+s.Cat.T("migrations")+` SET verify = $2, updated_at = now() WHERE id = $1`, id, b)
	return err
}

// SetError records the last error without changing the phase.
func (s *Store) SetError(ctx context.Context, id, msg string) error {
	_, err := s.Pool.Exec(ctx, `UPDATE `+s.Cat.T("migrations")+` SET error = nullif($2, ''), updated_at = now() WHERE id = $1`, id, msg)
	return err
}

// Event appends to the audit log.
func (s *Store) Event(ctx context.Context, q pgsql.Querier, id, kind, msg string, data any) error {
	var b []byte
	if data != nil {
		var err error
		if b, err = json.Marshal(data); err != nil {
			return err
		}
	}
	if _, err := q.Exec(ctx, `INSERT INTO `+s.Cat.T("events")+` (migration_id, kind, message, data) VALUES ($1, $2, $3, $4)`, id, kind, msg, b); err != nil {
		return fmt.Errorf("migration %s: record event: %w", id, err)
	}
	return nil
}

// EventRecord is one audit-log entry.
type EventRecord struct {
	ID      int64           `json:"id"`
	At      time.Time       `json:"at"`
	Actor   string          `json:"actor"`
	Kind    string          `json:"kind"`
	Message string          `json:"message"`
	Data    json.RawMessage `json:"data,omitempty"`
}

// Events reads a migration's audit log in order.
func (s *Store) Events(ctx context.Context, id string) ([]EventRecord, error) {
	rows, err := s.Pool.Query(ctx, `SELECT id, at, actor, kind, message, data FROM `+s.Cat.T("events")+` WHERE migration_id = $1 ORDER BY id`, id)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (EventRecord, error) {
		var e EventRecord
		err := r.Scan(&e.ID, &e.At, &e.Actor, &e.Kind, &e.Message, &e.Data)
		return e, err
	})
}

// InitRanges records the copy's key ranges (once; a resumed copy keeps them).
func (s *Store) InitRanges(ctx context.Context, q pgsql.Querier, id string, ranges []backfill.Range) error {
	for _, r := range ranges {
		if _, err := q.Exec(ctx, `INSERT INTO `+s.Cat.T("copy_ranges")+` (migration_id, range_no, lower_key, upper_key)
			VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING`, id, r.No, r.Lower, r.Upper); err != nil {
			return fmt.Errorf("migration %s: record copy ranges: %w", id, err)
		}
	}
	return nil
}

// Ranges reads the copy's ranges with their checkpoints.
func (s *Store) Ranges(ctx context.Context, id string) ([]backfill.Range, error) {
	rows, err := s.Pool.Query(ctx, `SELECT range_no, lower_key, upper_key, last_key, done, rows_copied FROM `+s.Cat.T("copy_ranges")+` WHERE migration_id = $1 ORDER BY range_no`, id)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (backfill.Range, error) {
		var x backfill.Range
		err := r.Scan(&x.No, &x.Lower, &x.Upper, &x.Last, &x.Done, &x.Rows)
		return x, err
	})
}

// rangeCheckpointer saves copy progress in the batch's transaction.
type rangeCheckpointer struct {
	s  *Store
	id string
}

func (c rangeCheckpointer) SaveRange(ctx context.Context, tx pgx.Tx, r backfill.Range) error {
	_, err := tx.Exec(ctx, `UPDATE `+c.s.Cat.T("copy_ranges")+` SET last_key = $3, done = $4, rows_copied = $5, updated_at = now()
		WHERE migration_id = $1 AND range_no = $2`, c.id, r.No, r.Last, r.Done, r.Rows)
	return err
}

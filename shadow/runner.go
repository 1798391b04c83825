package shadow

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	gosync "sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/pace"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/retry"
	"github.com/shadowctl/shadowctl/internal/rowmap"
	"github.com/shadowctl/shadowctl/lock"
	"github.com/shadowctl/shadowctl/sync"
	"golang.org/x/sync/errgroup"
)

// ErrStopped means the migration was moved by someone else (abort, pause)
// while this process drove it.
var ErrStopped = errors.New("the migration was stopped")

// ErrGreenIndexMissing means that at the end of verification one of green's
// indexes is missing or invalid; driving the migration again builds it.
var ErrGreenIndexMissing = errors.New("an index of green is missing or invalid after its build; drive the migration again (`shadowctl drive`) to build it again")

// Failpoints let tests interrupt the runner at exact places. Nil ones are off.
type Failpoints struct {
	// CopyBatch runs inside each copy batch's transaction before its commit.
	CopyBatch func(ctx context.Context, r backfill.Range) error
	// CopyBatchStart runs inside each copy batch's transaction before the
	// batch statement reads anything.
	CopyBatchStart func(ctx context.Context, tx pgx.Tx, r backfill.Range) error
	// AfterPhase runs after a phase change has been committed.
	AfterPhase func(ctx context.Context, to Phase) error
	// FinalizeIdentityRead runs inside finalize's transaction right after it
	// read the last value of blue's identity sequence seq.
	FinalizeIdentityRead func(ctx context.Context, seq pgsql.QualifiedName) error
}

// Runner drives migrations through their phases. The same runner serves
// `start` in the foreground and the daemon.
type Runner struct {
	Pool       *pgxpool.Pool
	ConnConfig *pgx.ConnConfig // for the dedicated claim connection
	Store      *Store
	Log        zerolog.Logger
	Failpoints Failpoints
	// Progress, when set, is told about copy progress (rows read so far).
	Progress func(id string, rows int64)
	// SyncSetupTimeout bounds how long installing or removing the sync may
	// keep retrying its short lock.
	SyncSetupTimeout time.Duration
	// CopyGuardPatience bounds how long a copy batch waits for its key
	// buckets in all (0: backfill.DefaultGuardPatience).
	CopyGuardPatience time.Duration
	// ClaimWait is how long Drive waits for another driver of the same
	// migration to let go before failing with ErrClaimed (default 30s).
	ClaimWait time.Duration

	paces *paceCache // shared by copies of the runner
}

// paceCache keeps one load gauge per migration, so that the busy state the
// copy measured carries over into verification and the apply (a fresh gauge
// starts from one sample, and one taken at a quiet instant let the first
// steps of a phase run flat out).
type paceCache struct {
	mu     gosync.Mutex
	gauges map[string]pace.Func
}

func (c *paceCache) get(key string, newGauge func() pace.Func) pace.Func {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gauges == nil {
		c.gauges = map[string]pace.Func{}
	}
	f, ok := c.gauges[key]
	if !ok {
		f = newGauge()
		c.gauges[key] = f
	}
	return f
}

// NewRunner returns a runner over the catalog cat.
func NewRunner(pool *pgxpool.Pool, cat catalog.Catalog, log zerolog.Logger) *Runner {
	return &Runner{Pool: pool, ConnConfig: pool.Config().ConnConfig, Store: &Store{Pool: pool, Cat: cat}, Log: log, paces: &paceCache{}}
}

// Submit checks a request against the database (nothing is created if it is
// refused) and records the migration in phase pending.
func (r *Runner) Submit(ctx context.Context, req Request) (*Migration, error) {
	if err := req.Normalize(); err != nil {
		return nil, err
	}
	if _, err := parseAlter(req.Alter); err != nil && strings.TrimSpace(req.Alter) != "" {
		return nil, err
	}
	// A migration's driver holds an advisory lock for hours; through a
	// transaction pool that lock protects nothing. Refuse before anything
	// is recorded, rather than at the first claim after it.
	if err := lock.CheckDirect(ctx, r.ConnConfig); err != nil {
		return nil, err
	}
	if _, _, err := r.Store.Cat.Init(ctx, r.Pool); err != nil {
		return nil, err
	}
	name, err := splitTableName(ctx, r.Pool, req.Table)
	if err != nil {
		return nil, err
	}
	req.Table = name.Schema + "." + name.Name
	blue, err := loadBlue(ctx, r.Pool, name)
	if err != nil {
		return nil, err
	}
	need := blue.TotalBytes
	if greenGetsFillfactor(blue) {
		need = need * 100 / greenFillfactor // the room left on green's pages
	}
	if req.MaxExtraStorage > 0 && need > req.MaxExtraStorage {
		return nil, fmt.Errorf("%s: %w: green needs about %s (the table and its indexes), over --max-extra-storage %s",
			name, ErrStorageBudget, HumanBytes(need), HumanBytes(req.MaxExtraStorage))
	}
	if id, err := r.Store.ActiveOn(ctx, name); err != nil {
		return nil, err
	} else if id != "" {
		return nil, fmt.Errorf("table %s: %w: %s (continue it with `shadowctl drive %s`, or abort it first)", name, ErrTableBusy, id, id)
	}
	if req.ID == "" {
		req.ID = newID(name.Name)
	}
	if req.Sync == SyncLogical {
		if err := r.preflightLogical(ctx, blue); err != nil {
			return nil, err
		}
	}
	// Preflight: build green for real in a transaction that is rolled back.
	if err := r.dryRun(ctx, req, blue); err != nil {
		return nil, err
	}
	m := &Migration{ID: req.ID, Table: name, GreenSchema: req.GreenSchema, Sync: req.Sync, Request: req, RowsEstimated: blue.RowEstimate}
	if err := pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error { return r.Store.Create(ctx, tx, m) }); err != nil {
		return nil, err
	}
	r.Log.Info().Str("migration", m.ID).Str("table", name.String()).Int64("rows_estimated", blue.RowEstimate).Msg("migration submitted")
	return r.Store.Get(ctx, r.Pool, m.ID)
}

// dryRun builds green, the sync functions and the mappings in a transaction
// that is always rolled back: everything PostgreSQL would refuse is found
// before anything exists. It takes no lock on blue beyond ACCESS SHARE.
func (r *Runner) dryRun(ctx context.Context, req Request, blue *pgmeta.Table) error {
	tx, err := r.Pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx)
	if err := pgsql.SetLocalLockTimeout(ctx, tx, max(req.LockTimeout, time.Second)); err != nil {
		return err
	}
	plan, _, err := buildGreen(ctx, tx, req, blue, namesFor(req.ID, blue.Name))
	if err != nil {
		return err
	}
	m := &Migration{ID: req.ID, Table: blue.QName(), Request: req, State: State{Plan: plan}}
	for _, t := range []sync.Trigger{r.forwardSync(m), r.reverseSync(m)} {
		// Only the functions: creating the triggers would lock blue.
		for _, f := range t.FunctionsSQL() {
			if _, err := tx.Exec(ctx, f); err != nil {
				return fmt.Errorf("%w: the sync function does not compile: %s", ErrBadMapping, pgsql.Describe(err))
			}
		}
	}
	return nil
}

func newID(table string) string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	base := strings.ToLower(table)
	base = strings.Map(func(r rune) rune {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') || r == '_' || r == '-' {
			return r
		}
		return '_'
	}, base)
	return truncate(base, 24) + "-" + time.Now().UTC().Format("20060102-150405") + "-" + hex.EncodeToString(b)
}

// HumanBytes renders a byte count for people.
func HumanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for x := n / unit; x >= unit; x /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// Retry moves a failed migration back to the phase it failed in, so that
// Drive continues from its checkpoints. Only phases a runner drives can be
// retried; a logical-sync migration lost its slot when it failed and must be
// aborted and started again.
func (r *Runner) Retry(ctx context.Context, id string) (*Migration, error) {
	m, err := r.Store.Get(ctx, r.Pool, id)
	if err != nil || m.Phase != Failed {
		return m, err
	}
	var from string
	err = r.Pool.QueryRow(ctx, `SELECT coalesce(data->>'from', '') FROM `+r.Store.Cat.T("events")+`
		WHERE migration_id = $1 AND kind = 'phase' AND data->>'to' = 'failed' ORDER BY id DESC LIMIT 1`, id).Scan(&from)
	if err != nil {
		return m, fmt.Errorf("migration %s: find the phase it failed in: %w", id, err)
	}
	phase := Phase(from)
	if chainIndex(phase) < chainIndex(Preparing) || chainIndex(phase) > chainIndex(Verifying) {
		return m, fmt.Errorf("migration %s failed in %q, which cannot be retried: %w (abort it, or roll it back if green serves)", id, from, ErrWrongPhase)
	}
	if m.Sync == SyncLogical && !m.State.LogicalDone {
		return m, fmt.Errorf("migration %s used the logical sync, whose slot was dropped when it failed: %w (abort it and start again)", id, ErrWrongPhase)
	}
	if err := r.Store.SetPhase(ctx, r.Pool, id, []Phase{Failed}, phase, ""); err != nil {
		return m, err
	}
	r.Log.Info().Str("migration", id).Str("phase", from).Msg("retrying the failed migration from its checkpoints")
	return r.Store.Get(ctx, r.Pool, id)
}

// chain is the order of the phases a runner drives on its own.
var chain = []Phase{Pending, Preparing, Copying, Verifying, Ready}

func chainIndex(p Phase) int {
	for i, c := range chain {
		if c == p {
			return i
		}
	}
	return -1
}

// Drive runs the migration's phases until it reaches until (ready at most),
// fails, or ctx ends. It claims the migration first, so only one process
// drives it; a killed driver's claim ends with its connection and a new one
// continues from the last checkpoint.
func (r *Runner) Drive(ctx context.Context, id string, until Phase) (*Migration, error) {
	if chainIndex(until) < 0 {
		return nil, fmt.Errorf("%w: --until must be one of %v", ErrBadRequest, chain)
	}
	wait := r.ClaimWait
	if wait <= 0 {
		wait = 30 * time.Second
	}
	claim, err := r.claim(ctx, id, wait)
	if err != nil {
		return nil, err
	}
	defer claim.release()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		select {
		case <-claim.lost:
			cancel(fmt.Errorf("migration %s: %w", id, ErrClaimLost))
		case <-ctx.Done():
		}
	}()
	for {
		m, err := r.Store.Get(ctx, r.Pool, id)
		if err != nil {
			return nil, err
		}
		idx := chainIndex(m.Phase)
		if idx < 0 || idx >= chainIndex(until) {
			if m.Phase == Failed {
				return m, fmt.Errorf("migration %s failed: %s", id, m.Error)
			}
			return m, nil
		}
		if m.Paused {
			return m, nil
		}
		var stepErr error
		switch m.Phase {
		case Pending, Preparing:
			stepErr = r.prepare(ctx, m)
		case Copying:
			stepErr = r.copy(ctx, m)
		case Verifying:
			stepErr = r.verify(ctx, m)
		}
		if stepErr != nil {
			if cause := context.Cause(ctx); cause != nil && ctx.Err() != nil {
				return m, cause
			}
			return m, r.fail(context.WithoutCancel(ctx), m, stepErr, claim)
		}
	}
}

// fail records a phase's error. A request that cannot work as given (a row
// that cannot be converted, a refused ALTER) is aborted at once, so the
// database is as it was; anything else stays failed for the operator. held is
// the driver's own claim (the abort must not wait for it). The returned error
// wraps stepErr.
func (r *Runner) fail(ctx context.Context, m *Migration, stepErr error, held *claimHandle) error {
	if errors.Is(stepErr, ErrStopped) {
		return stepErr
	}
	if IsTransient(stepErr) {
		r.Log.Warn().Str("migration", m.ID).Str("phase", string(m.Phase)).Err(stepErr).Msg("database connection lost; the migration keeps its checkpoint")
		return fmt.Errorf("migration %s: %s: %w: %w", m.ID, m.Phase, ErrTransient, stepErr)
	}
	msg := fmt.Sprintf("%s: %v", m.Phase, stepErr)
	if code := pgsql.Code(stepErr); code != "" && !strings.Contains(msg, code) {
		msg += " (SQLSTATE " + code + ")"
	}
	r.Log.Error().Str("migration", m.ID).Str("phase", string(m.Phase)).Err(stepErr).Msg("migration failed")
	if m.logical() {
		// Nobody reads the slot of a failed migration: never leave it pinning WAL.
		if err := r.removeLogical(ctx, m, ""); err != nil {
			r.Log.Error().Err(err).Msg("could not drop the replication slot")
		}
	}
	if errors.Is(stepErr, backfill.ErrBadRow) || isBadRequest(stepErr) {
		if err := r.abort(ctx, m.ID, msg, held); err != nil {
			return &stepError{msg: fmt.Sprintf("%s; and the cleanup failed: %v (run `shadowctl abort %s`)", msg, err, m.ID), err: stepErr}
		}
		return &stepError{msg: fmt.Sprintf("migration %s: %s; everything it created was removed", m.ID, msg), err: stepErr}
	}
	// From whatever phase the catalog holds now (a step may have moved it).
	from := []Phase{m.Phase}
	if cur, err := r.Store.Get(ctx, r.Pool, m.ID); err == nil && !cur.Phase.Terminal() && cur.Phase != Failed {
		from = append(from, cur.Phase)
	}
	if err := r.Store.SetPhase(ctx, r.Pool, m.ID, from, Failed, msg); err != nil {
		r.Log.Error().Err(err).Msg("could not record the failure")
	}
	return &stepError{msg: fmt.Sprintf("migration %s: %s", m.ID, msg), err: stepErr}
}

// stepError is a phase's failure as told to the operator; it wraps the cause
// so that callers can tell causes apart with errors.Is.
type stepError struct {
	msg string
	err error
}

func (e *stepError) Error() string { return e.msg }
func (e *stepError) Unwrap() error { return e.err }

func (r *Runner) afterPhase(ctx context.Context, to Phase) error {
	if r.Failpoints.AfterPhase != nil {
		return r.Failpoints.AfterPhase(ctx, to)
	}
	return nil
}

// prepare builds green and installs the sync. Each step is one transaction,
// so a crash leaves either nothing or a finished step to continue from.
func (r *Runner) prepare(ctx context.Context, m *Migration) error {
	if m.State.Plan == nil {
		err := pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error {
			if err := r.Store.SetPhase(ctx, tx, m.ID, []Phase{Pending, Preparing}, Preparing, ""); err != nil {
				return err
			}
			blue, err := loadBlue(ctx, tx, m.Table)
			if err != nil {
				return err
			}
			plan, createdSchema, err := buildGreen(ctx, tx, m.Request, blue, namesFor(m.ID, m.Table.Name))
			if err != nil {
				return err
			}
			if !m.logical() {
				if plan.CopyGuard, err = copyGuard(ctx, tx, m.ID, plan.Forward); err != nil {
					return err
				}
			}
			m.State.Plan, m.State.CreatedGreenSchema, m.State.Serving = plan, createdSchema, "blue"
			return r.Store.SaveState(ctx, tx, m.ID, m.State)
		})
		if err != nil {
			return err
		}
		m.Phase = Preparing // committed: a failure from here on is recorded from preparing
		r.Log.Info().Str("migration", m.ID).Str("green", m.State.Plan.Forward.Target.String()).Msg("green built")
		if err := r.afterPhase(ctx, Preparing); err != nil {
			return err
		}
	}
	if m.logical() {
		return r.prepareLogical(ctx, m)
	}
	trig := r.forwardSync(m)
	return r.withShortLock(ctx, m, "install the sync triggers on "+m.Table.String(), func(tx pgx.Tx) error {
		if err := sync.Exec(ctx, tx, trig.CreateSQL()); err != nil {
			return err
		}
		// Blue is locked against writes until this commits, so the key
		// ranges cover every row that the triggers did not see.
		c := r.copier(m)
		ranges, err := c.SplitRanges(ctx, tx, max(m.Request.Workers*4, 1))
		if err != nil {
			return err
		}
		if err := r.Store.InitRanges(ctx, tx, m.ID, ranges); err != nil {
			return err
		}
		return r.Store.SetPhase(ctx, tx, m.ID, []Phase{Preparing}, Copying, "")
	})
}

// forwardSync is the blue→green trigger sync of a migration.
func (r *Runner) forwardSync(m *Migration) sync.Trigger {
	p := m.State.Plan
	cat := r.Store.Cat.Schema
	return sync.Trigger{
		Mapping:      p.Forward,
		Func:         pgsql.QualifiedName{Schema: cat, Name: p.Names.ForwardFunc},
		Name:         p.Names.ForwardTrig,
		TruncateFunc: pgsql.QualifiedName{Schema: cat, Name: p.Names.TruncateFunc},
		TruncateName: p.Names.TruncateTrig,
		OnTruncate: fmt.Sprintf(`UPDATE %s SET phase = 'failed', error = %s, updated_at = now(), phase_changed_at = now() WHERE id = %s AND phase NOT IN ('aborted', 'finalized');
INSERT INTO %s (migration_id, kind, message) VALUES (%s, 'phase', 'failed: TRUNCATE on blue');
PERFORM pg_notify(%s, %s)`,
			r.Store.Cat.T("migrations"),
			pgsql.Literal(fmt.Sprintf("TRUNCATE on blue %s: green no longer matches; abort this migration and start again", m.Table)),
			pgsql.Literal(m.ID), r.Store.Cat.T("events"), pgsql.Literal(m.ID), pgsql.Literal(NotifyChannel), pgsql.Literal(m.ID)),
		SearchPath: p.SearchPath,
		Guard:      p.CopyGuard,
	}
}

// copyGuard sizes the key buckets that guard the copy's rows in trigger sync
// (rowmap.KeyBuckets), when blue's first key column is an integer; nil
// otherwise (the copy then locks every row it reads). The span only sets
// the buckets' width: rows outside it are guarded all the same.
func copyGuard(ctx context.Context, q pgsql.Querier, id string, fwd rowmap.Mapping) (*rowmap.KeyBuckets, error) {
	if !isInt(fwd.SourceKeyTypes[0]) {
		return nil, nil
	}
	lo, hi, err := backfill.IntKeySpan(ctx, q, fwd)
	if err != nil {
		return nil, fmt.Errorf("key span of %s: %w", fwd.Source, err)
	}
	if lo == nil { // empty
		lo, hi = new(int64), new(int64)
	}
	h := fnv.New32a()
	h.Write([]byte("shadowctl copy " + id))
	return rowmap.NewKeyBuckets(int32(h.Sum32()), fwd.SourceKey[0], *lo, *hi), nil
}

// reverseSync is the green→blue trigger sync used while green serves. It
// writes to blue under its parked name: while green serves, the original name
// is the view over green.
func (r *Runner) reverseSync(m *Migration) sync.Trigger {
	p := m.State.Plan
	mapping := p.Reverse
	mapping.Target = pgsql.QualifiedName{Schema: m.Table.Schema, Name: p.Names.ParkedBlue}
	return sync.Trigger{
		Mapping:    mapping,
		Func:       pgsql.QualifiedName{Schema: r.Store.Cat.Schema, Name: p.Names.ReverseFunc},
		Name:       p.Names.ReverseTrig,
		SearchPath: p.SearchPath,
	}
}

func (r *Runner) copier(m *Migration) *backfill.Copier {
	c := &backfill.Copier{
		Pool:        r.Pool,
		Mapping:     m.State.Plan.Forward,
		Workers:     m.Request.Workers,
		BatchSize:   m.Request.BatchSize,
		LockTimeout: max(m.Request.LockTimeout, time.Second),
		Log:         r.Log.With().Str("migration", m.ID).Logger(),
		Failpoint:   r.Failpoints.CopyBatch,

		StartFailpoint: r.Failpoints.CopyBatchStart,
	}
	c.MaxRowsPerSecond.Store(int64(m.Request.MaxRowsPerSecond))
	// Logical sync: the copy reads blue's current rows, unlocked, and the
	// stream replayed from the slot's start converges green (docs/logical.md,
	// "Initial copy").
	c.NoLock = m.logical()
	c.Guard = m.State.Plan.CopyGuard
	c.GuardLockTimeout = m.Request.LockTimeout
	c.GuardPatience = r.CopyGuardPatience
	c.Gate = func(ctx context.Context) error {
		if m.logical() && m.State.Slot != "" {
			if err := sync.CheckRetainedWAL(ctx, r.Pool, m.State.Slot, m.Request.MaxRetainedWAL); err != nil {
				return err
			}
		}
		cur, err := r.Store.Get(ctx, r.Pool, m.ID)
		if err != nil {
			return err
		}
		if cur.Phase != Copying || cur.Paused {
			return fmt.Errorf("migration %s is now %s (paused=%v): %w", m.ID, cur.Phase, cur.Paused, ErrStopped)
		}
		return r.gateLive(ctx, cur, c)
	}
	if r.Progress != nil {
		c.Progress = func(n int64) { r.Progress(m.ID, n) }
	}
	c.Pace = r.pace(m)
	return c
}

// copy runs the bulk copy from its checkpoints. Green's deferred indexes and
// constraints are built in the verifying phase, alongside the comparison.
func (r *Runner) copy(ctx context.Context, m *Migration) error {
	ranges, err := r.Store.Ranges(ctx, m.ID)
	if err != nil {
		return err
	}
	start := time.Now()
	c := r.copier(m)
	if err := c.Run(ctx, ranges, rangeCheckpointer{s: r.Store, id: m.ID}); err != nil {
		return err
	}
	r.Log.Info().Str("migration", m.ID).Dur("took", time.Since(start)).Msg("bulk copy done")
	if err := pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error {
		return r.Store.SetPhase(ctx, tx, m.ID, []Phase{Copying}, Verifying, "")
	}); err != nil {
		return err
	}
	return r.afterPhase(ctx, Verifying)
}

// buildDeferred builds green's deferred indexes and foreign keys, then
// vacuums it.
func (r *Runner) buildDeferred(ctx context.Context, m *Migration) error {
	if err := r.buildGreenIndexes(ctx, m); err != nil {
		return err
	}
	return r.vacuumGreen(ctx, m)
}

// withMaintenanceConn runs fn on a connection of its own; gentle, called
// before each step, sets it to run that step gently while the application is
// busy: no parallel workers, and autovacuum's cost delay.
func (r *Runner) withMaintenanceConn(ctx context.Context, m *Migration, fn func(conn *pgxpool.Conn, gentle func() error) error) error {
	pc := r.pace(m)
	conn, err := r.Pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	defer func() {
		// The connection goes back to the pool.
		_, _ = conn.Exec(context.WithoutCancel(ctx), "RESET max_parallel_maintenance_workers; RESET vacuum_cost_delay")
	}()
	return fn(conn, func() error {
		workers, delay := "DEFAULT", "DEFAULT"
		if pc(ctx).Busy {
			workers, delay = "0", "'2ms'"
		}
		_, err := conn.Exec(ctx, "SET max_parallel_maintenance_workers = "+workers+"; SET vacuum_cost_delay = "+delay)
		return err
	})
}

// buildGreenIndexes creates green's deferred indexes, then (trigger sync)
// its foreign keys NOT VALID. Trigger sync builds them CONCURRENTLY (a plain
// CREATE INDEX would block the sync, and through it the application), one
// at a time (each takes a lock that conflicts with the next); while the
// application is quiet it first tries plain builds that yield green to the
// first session that waits for it (buildWhileQuiet). Logical sync builds
// them plainly, the key first and alone; the others go two at a time while
// the application is quiet: a build's last phase runs on one core.
func (r *Runner) buildGreenIndexes(ctx context.Context, m *Migration) error {
	p := m.State.Plan
	green := p.Forward.Target
	ixs := p.DeferredIndexes
	lanes, how := 1, buildConcurrently
	if !m.logical() && len(ixs) > 0 && !r.pace(m)(ctx).Busy {
		var err error
		if ixs, err = r.buildWhileQuiet(ctx, m, ixs); err != nil {
			return err
		}
	}
	if m.logical() {
		how = buildPlain
		if len(ixs) > 0 && ixs[0].Name == p.Green.KeyIndex {
			if err := r.withMaintenanceConn(ctx, m, func(conn *pgxpool.Conn, gentle func() error) error {
				return r.buildGreenIndex(ctx, m, conn, gentle, ixs[0], how)
			}); err != nil {
				return err
			}
			ixs = ixs[1:]
		}
		if !r.pace(m)(ctx).Busy {
			lanes = 2
		}
	}
	next := make(chan pgmeta.Index)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		defer close(next)
		for _, ix := range ixs {
			select {
			case next <- ix:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range min(lanes, len(ixs)) {
		g.Go(func() error {
			return r.withMaintenanceConn(gctx, m, func(conn *pgxpool.Conn, gentle func() error) error {
				for ix := range next {
					if err := r.buildGreenIndex(gctx, m, conn, gentle, ix, how); err != nil {
						return err
					}
				}
				return nil
			})
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	// Logical sync: green's foreign keys wait for the cutover. The stream
	// replays changes that blue has long moved past (the copy's backlog,
	// a follower's restart): an order whose customer was deleted since is
	// inserted, then deleted again. A foreign key on green would reject the
	// insert and stop the sync for good.
	//
	// Trigger sync: they are added NOT VALID now, so every write the sync
	// makes is checked from here on, and the rows already there are
	// validated at finalize (as in logical sync). Validating them
	// here would add a full join of green with each referenced table to
	// time to ready (1.5 s of 15 at 2,000,000 rows) and prove nothing the
	// verification does not: green holds exactly blue's rows, which blue's
	// own foreign key has checked.
	if !m.logical() {
		for _, c := range p.DeferredConstraints {
			if err := r.withShortLock(ctx, m, "add foreign key "+c.Name, func(tx pgx.Tx) error {
				stmts, err := addGreenFKsSQL(ctx, tx, green, []pgmeta.Constraint{c})
				if err != nil {
					return err
				}
				return sync.Exec(ctx, tx, stmts)
			}); err != nil {
				return err
			}
		}
	}
	return nil
}

// buildGreenIndex builds one of green's deferred indexes on conn, as how
// says, and the constraint it backs. A restart finds a plain build done or
// not begun, and drops what a killed concurrent one left.
func (r *Runner) buildGreenIndex(ctx context.Context, m *Migration, conn *pgxpool.Conn, gentle func() error, ix pgmeta.Index, how indexBuild) error {
	p := m.State.Plan
	green := p.Forward.Target
	start := time.Now()
	if err := gentle(); err != nil {
		return err
	}
	// A concurrent build killed halfway leaves an INVALID index: drop it.
	var valid *bool
	if err := conn.QueryRow(ctx, `SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)`,
		pgsql.QualifiedName{Schema: green.Schema, Name: ix.Name}.Quoted()).Scan(&valid); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return err
	}
	if valid != nil && !*valid {
		if _, err := conn.Exec(ctx, "DROP INDEX CONCURRENTLY IF EXISTS "+pgsql.QualifiedName{Schema: green.Schema, Name: ix.Name}.Quoted()); err != nil {
			return fmt.Errorf("drop invalid index %s: %w", ix.Name, err)
		}
	}
	stmt, err := rewriteIndexDef(ix.Def, p.Green, green, ix.Name, how == buildConcurrently)
	if err != nil {
		return err
	}
	if how != buildConcurrently {
		// A plain build (logical sync, where only the apply writes green
		// and waits for the builds; trigger sync while quiet) reads the
		// table once, where a concurrent one reads it twice and waits out
		// every older transaction in between. IF NOT EXISTS: a restart
		// finds it done or not begun.
		stmt = strings.Replace(stmt, "INDEX ", "INDEX IF NOT EXISTS ", 1)
	}
	if how == buildPlainYielding {
		// One statement string, one implicit transaction: the lock is
		// held only while the server runs it, so a cancel always finds
		// it running (a lock held between two round trips could not be
		// cancelled).
		stmt = quietBuildTag + pgsql.LocalLockTimeoutSQL(m.Request.LockTimeout) + "; LOCK TABLE ONLY " + green.Quoted() + " IN SHARE MODE; " + stmt
	}
	if _, err := conn.Exec(ctx, stmt); err != nil {
		return fmt.Errorf("build index %s on green: %w", ix.Name, err)
	}
	if ix.Constraint != "" {
		kind := map[string]string{"p": "PRIMARY KEY", "u": "UNIQUE"}[ix.ConType]
		err := r.withShortLock(ctx, m, "attach constraint "+ix.Constraint, func(tx pgx.Tx) error {
			var has bool
			if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass($1) AND conname = $2)`, green.Quoted(), ix.Constraint).Scan(&has); err != nil || has {
				return err
			}
			_, err := tx.Exec(ctx, fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s %s USING INDEX %s", green.Quoted(), pgsql.Ident(ix.Constraint), kind, pgsql.Ident(ix.Name)))
			return err
		})
		if err != nil {
			return err
		}
	}
	r.Log.Info().Str("migration", m.ID).Str("index", ix.Name).Bool("concurrently", how == buildConcurrently).Dur("took", time.Since(start)).Msg("green index built")
	return nil
}

// vacuumGreen vacuums and analyzes green before it can serve. ANALYZE: the
// planner knows nothing of a freshly loaded table. VACUUM: the bulk copy
// makes autovacuum pick green soon after, and an autovacuum holding green
// blocks the swap's lock (its lock_timeout is far below the deadlock timeout
// after which PostgreSQL would cancel the autovacuum): in the 8,000,000-row
// bench the cutover retried for 40 s behind one. SKIP_LOCKED: when an
// autovacuum is already at it, it does the same work.
func (r *Runner) vacuumGreen(ctx context.Context, m *Migration) error {
	green := m.State.Plan.Forward.Target
	return r.withMaintenanceConn(ctx, m, func(conn *pgxpool.Conn, gentle func() error) error {
		start := time.Now()
		if err := gentle(); err != nil {
			return err
		}
		if _, err := conn.Exec(ctx, "VACUUM (ANALYZE, SKIP_LOCKED) "+green.Quoted()); err != nil {
			return fmt.Errorf("vacuum green %s: %w", green, err)
		}
		r.Log.Info().Str("migration", m.ID).Dur("took", time.Since(start)).Msg("green vacuumed and analyzed")
		return nil
	})
}

// addGreenFKsSQL returns the statements that add those of green's deferred
// foreign keys that are not there yet, NOT VALID: new writes are checked at
// once, existing rows by validateGreenFKs. One catalog query for them all:
// the cutover runs this under its lock.
func addGreenFKsSQL(ctx context.Context, q pgsql.Querier, green pgsql.QualifiedName, cs []pgmeta.Constraint) ([]string, error) {
	if len(cs) == 0 {
		return nil, nil
	}
	names := make([]string, len(cs))
	for i, c := range cs {
		names[i] = c.Name
	}
	var have []string
	if err := q.QueryRow(ctx, `SELECT coalesce(array_agg(conname::text), '{}') FROM pg_constraint WHERE conrelid = to_regclass($1) AND conname = ANY($2)`, green.Quoted(), names).Scan(&have); err != nil {
		return nil, fmt.Errorf("list the foreign keys of %s: %w", green, err)
	}
	var stmts []string
	for _, c := range cs {
		if !slices.Contains(have, c.Name) {
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s %s NOT VALID", green.Quoted(), pgsql.Ident(c.Name), c.Def))
		}
	}
	return stmts, nil
}

// validateGreenFKs validates green's deferred foreign keys under the
// migration's lock_timeout, retried while the lock is busy (an autovacuum of
// green right after the cutover holds the same lock for seconds).
func (r *Runner) validateGreenFKs(ctx context.Context, m *Migration, green pgsql.QualifiedName) error {
	cs := m.State.Plan.DeferredConstraints
	if len(cs) == 0 {
		return nil
	}
	return r.withShortLock(ctx, m, "validate the foreign keys of "+green.String(), func(tx pgx.Tx) error {
		return validatePendingFKs(ctx, tx, green, cs)
	})
}

// validatePendingFKs validates those of green's deferred foreign keys that
// are not valid yet (only those: VALIDATE takes SHARE UPDATE EXCLUSIVE even
// when there is nothing to do). Writes go on meanwhile.
func validatePendingFKs(ctx context.Context, q pgsql.Querier, green pgsql.QualifiedName, cs []pgmeta.Constraint) error {
	if len(cs) == 0 {
		return nil
	}
	names := make([]string, len(cs))
	for i, c := range cs {
		names[i] = c.Name
	}
	rows, err := q.Query(ctx, `SELECT conname FROM pg_constraint WHERE conrelid = to_regclass($1) AND NOT convalidated AND conname = ANY($2)`, green.Quoted(), names)
	if err != nil {
		return fmt.Errorf("foreign keys of green %s: %w", green, err)
	}
	pending, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("foreign keys of green %s: %w", green, err)
	}
	for _, name := range pending {
		if _, err := q.Exec(ctx, fmt.Sprintf("ALTER TABLE %s VALIDATE CONSTRAINT %s", green.Quoted(), pgsql.Ident(name))); err != nil {
			return fmt.Errorf("validate foreign key %s on green %s: %w", name, green, err)
		}
	}
	return nil
}

// verify builds green's deferred indexes and constraints and, at the same
// time, compares green with the mapping of blue, repairing chunks that
// differ; a difference that persists fails the migration. The two overlap
// because neither needs the other (the comparison reads green by its key,
// which the copy already had) and the builds spend much of their time
// waiting: on an idle 2-core server this takes about 2 s off time to ready
// at 2,000,000 rows. A restart repeats whichever part had not finished
// (the builds are idempotent).
func (r *Runner) verify(ctx context.Context, m *Migration) error {
	g, gctx := errgroup.WithContext(ctx)
	if !m.State.IndexesBuilt {
		if m.logical() {
			// Plain builds block green's writers: the apply (and with it
			// the backlog's drain) starts when they are done, so a long
			// build is not taken for a stalled sync. (Starting the stream
			// before the builds, so the WAL sender decodes the copy's rows
			// meanwhile, gained nothing at 2,000,000 rows: both are
			// CPU-bound on 2 cores.) The vacuum, on one core, runs with
			// the comparison and the stream.
			if err := r.buildGreenIndexes(ctx, m); err != nil {
				return err
			}
			g.Go(func() error { return r.vacuumGreen(gctx, m) })
		} else {
			g.Go(func() error { return r.buildDeferred(gctx, m) })
		}
	}
	g.Go(func() error { return r.compare(gctx, m) })
	if err := g.Wait(); err != nil {
		return err
	}
	// Green serves only with every index it will serve with, valid. The
	// builds say so when they return; this says so for whatever happened
	// to green since (an index dropped by hand, a build cut short after an
	// earlier run recorded them built). Not recorded as built, a restart
	// builds them again.
	if built, err := r.greenIndexesBuilt(ctx, m); err != nil {
		return err
	} else if !built {
		m.State.IndexesBuilt = false
		if err := r.Store.SaveState(ctx, r.Pool, m.ID, m.State); err != nil {
			return err
		}
		return fmt.Errorf("migration %s, green %s: %w", m.ID, m.State.Plan.Forward.Target, ErrGreenIndexMissing)
	}
	m.State.IndexesBuilt = true
	if err := pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error {
		if err := r.Store.SaveState(ctx, tx, m.ID, m.State); err != nil {
			return err
		}
		return r.Store.SetPhase(ctx, tx, m.ID, []Phase{Verifying}, Ready, "")
	}); err != nil {
		return err
	}
	return r.afterPhase(ctx, Ready)
}

// compare is verify's comparison of green with blue.
func (r *Runner) compare(ctx context.Context, m *Migration) error {
	v := r.verifier(m)
	if m.logical() {
		stop := r.ensureFollower(ctx, m)
		defer stop()
		// On an idle database the comparison starts with the stream, not
		// after the copy's backlog: a chunk that matches in one snapshot
		// is equal whatever green has yet to apply, and one that differs
		// waits for the stream to catch up before it is compared again.
		// The backlog is then only the copy's own rows, which the WAL
		// sender decodes on one core (2.6 s at 2,000,000 rows) while the
		// comparison runs on the others. While the application is busy the
		// backlog is drained first, as before: most chunks would differ
		// until it is, and the drain and the comparison would both take
		// from the application at once. The stall limit is the backlog's:
		// a chunk's catch-up may be the one that waits for all of it.
		if r.pace(m)(ctx).Busy {
			if err := r.catchUp(ctx, r.Pool, m, 0, time.Minute, false); err != nil {
				return err
			}
			// Smaller chunks while the application writes: with an
			// asynchronous sync a chunk written to while compared is
			// compared again, so hot chunks should be small. On an idle
			// database the default chunks compare the table in a quarter
			// of the statements (2,000,000 rows: 4.45 s against 5.13,
			// medians of six idle runs each, alternated).
			v.ChunkRows = 5000
		}
		v.CatchUp = func(ctx context.Context) error { return r.catchUp(ctx, r.Pool, m, 0, time.Minute, false) }
	}
	res, err := v.Run(ctx)
	if err == nil && m.logical() {
		// Ready means green is current, not only that it was equal.
		err = r.catchUp(ctx, r.Pool, m, 0, time.Minute, false)
	}
	if serr := r.Store.SaveVerify(ctx, r.Pool, m.ID, res); serr != nil && err == nil {
		err = serr
	}
	if err != nil {
		return err
	}
	r.Log.Info().Str("migration", m.ID).Int64("rows", res.Rows).Int("chunks", res.Chunks).Int("repaired", res.Repaired).
		Float64("seconds", res.Seconds).Msg("verified")
	return nil
}

func (r *Runner) verifier(m *Migration) *cutover.Verifier {
	p := m.State.Plan
	// Chunk along blue's key only when green can be searched by it in the
	// same order: same key columns indexed, integer or identical types.
	chunked := p.Green.LeadingIndexOn(p.Forward.MatchColumns())
	for i, c := range p.Forward.Match {
		bt := p.Forward.SourceKeyTypes[i]
		if c.TargetType != bt && !(isInt(bt) && isInt(c.TargetType)) {
			chunked = false
		}
	}
	return &cutover.Verifier{
		Pool: r.Pool, Mapping: p.Forward, Workers: max(m.Request.Workers, 1), Repair: true, Chunked: chunked,
		Pace:        r.pace(m),
		LockTimeout: m.Request.LockTimeout, Log: r.Log.With().Str("migration", m.ID).Logger(),
		// Stop at the next chunk when someone else moved the migration out of
		// the phase it was verified in (abort, pause, a swap): the same rule
		// as the copy's.
		Gate: func(ctx context.Context) error {
			cur, err := r.Store.Get(ctx, r.Pool, m.ID)
			if err != nil {
				return err
			}
			if cur.Phase != m.Phase || cur.Paused {
				return fmt.Errorf("migration %s is now %s (paused=%v): %w", m.ID, cur.Phase, cur.Paused, ErrStopped)
			}
			return nil
		},
	}
}

// pace is how hard a migration's copy and verification may run: all their
// workers on an idle database, one on a duty cycle while the application is
// busy.
func (r *Runner) pace(m *Migration) pace.Func {
	own := r.Pool.Config().ConnConfig.RuntimeParams["application_name"]
	gauge := func() pace.Func { return pace.AppLoad(r.Pool, own, max(m.Request.Workers, 1), m.Request.LoadShare) }
	if r.paces == nil {
		return gauge()
	}
	return r.paces.get(fmt.Sprintf("%s/%d/%g", m.ID, m.Request.Workers, m.Request.LoadShare), gauge)
}

func isInt(t string) bool { return t == "integer" || t == "bigint" || t == "smallint" }

// withShortLock runs fn in a transaction under the migration's lock_timeout,
// retrying with backoff and jitter while the lock is not granted, up to
// SyncSetupTimeout. It never queues behind the application for longer than
// the lock timeout at a time.
func (r *Runner) withShortLock(ctx context.Context, m *Migration, what string, fn func(tx pgx.Tx) error) error {
	limit := r.SyncSetupTimeout
	if limit <= 0 {
		limit = 5 * time.Minute
	}
	deadline := time.Now().Add(limit)
	for attempt := 0; ; attempt++ {
		err := pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error {
			if err := pgsql.SetLocalLockTimeout(ctx, tx, m.Request.LockTimeout); err != nil {
				return err
			}
			return fn(tx)
		})
		if err == nil || !pgsql.IsRetryable(err) {
			if err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: the lock was not granted within %s of retries (long transactions on the table? see pg_stat_activity): %w", what, limit, err)
		}
		r.Log.Debug().Str("migration", m.ID).Int("attempt", attempt+1).Msg(what + ": lock busy, retrying")
		if err := retry.Backoff(ctx, attempt, 50*time.Millisecond, 2*time.Second); err != nil {
			return err
		}
	}
}

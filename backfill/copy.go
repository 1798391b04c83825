package backfill

// This file: the chunked blue→green copy. Where its checkpoints are stored is
// the caller's business (an interface), and what a row becomes is the shared
// row mapping (internal/rowmap).

import (
	"context"
	"errors"
	"fmt"
	"strings"
	stdsync "sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/pace"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/retry"
	"github.com/shadowctl/shadowctl/internal/rowmap"
	"golang.org/x/sync/errgroup"
)

// ErrBadRow means a row of blue could not be converted into green's shape.
var ErrBadRow = errors.New("a row cannot be copied")

// Range is a slice of the source key space copied by one worker at a time:
// keys above Lower (exclusive, nil = from the start) up to Upper (inclusive on
// the first key column, nil = to the end). Last is the checkpoint.
type Range struct {
	No    int      `json:"no"`
	Lower []string `json:"lower,omitempty"`
	Upper []string `json:"upper,omitempty"`
	Last  []string `json:"last,omitempty"`
	Done  bool     `json:"done"`
	Rows  int64    `json:"rows"`
}

// Checkpointer persists a range's progress inside the batch's own
// transaction, so a batch and its checkpoint commit together or not at all.
type Checkpointer interface {
	SaveRange(ctx context.Context, tx pgx.Tx, r Range) error
}

// Copier copies the rows of Mapping.Source into Mapping.Target.
type Copier struct {
	Pool        *pgxpool.Pool
	Mapping     rowmap.Mapping
	Workers     int
	LockTimeout time.Duration
	Log         zerolog.Logger
	// BatchSize is the largest batch; batches shrink and grow to take about
	// TargetBatchTime each.
	BatchSize       int
	TargetBatchTime time.Duration
	// MaxRowsPerSecond caps the copy rate (0: no cap); changeable while running.
	MaxRowsPerSecond atomic.Int64
	// Progress, when set, is told about each committed batch.
	Progress func(rows int64)
	// Gate, when set, is called before each batch; it blocks while the copy
	// must wait (paused, throttled) and returns an error to stop.
	Gate func(ctx context.Context) error
	// Pace, when set, says how many of the Workers may copy now and on what
	// duty cycle; the others wait between ranges. It lets the copy use every
	// worker on an idle database and step back under load.
	Pace pace.Func
	// Failpoint, when set, runs inside each batch's transaction after the rows
	// were read and written and before the commit (tests use it to interleave).
	Failpoint func(ctx context.Context, r Range) error
	// NoLock leaves blue's rows unlocked (logical sync: nothing writes green
	// until the copy is done, and the stream, replayed afterwards from the
	// slot's start, converges green whatever moment each batch read).
	NoLock bool
	// StartFailpoint, when set, runs inside each batch's transaction before
	// the batch statement reads anything (tests use it to interleave).
	StartFailpoint func(ctx context.Context, tx pgx.Tx, r Range) error

	// Guard, when set (and NoLock is not), replaces the row locks with
	// key-bucket locks (rowmap.KeyBuckets): a batch first takes the locks
	// of the buckets its keys span, then reads and writes its rows unlocked.
	Guard *rowmap.KeyBuckets
	// GuardLockTimeout bounds the wait for the bucket locks (short: while
	// the batch waits, the application's deletes in those buckets queue
	// behind it).
	GuardLockTimeout time.Duration
	// GuardPatience is how long a batch waits for its buckets in all
	// (0: DefaultGuardPatience).
	GuardPatience time.Duration

	limiter     rateLimiter
	maxBatch    atomic.Int64 // SetBatchSize's live override of BatchSize
	liveWorkers atomic.Int64 // SetWorkers' live override of Workers
	busy        atomic.Bool  // the last pace said busy (logged on change)
}

// SetBatchSize changes the largest batch while the copy runs; each worker
// applies it before its next batch.
func (c *Copier) SetBatchSize(n int) { c.maxBatch.Store(int64(n)) }

func (c *Copier) batchSize() int {
	if n := c.maxBatch.Load(); n > 0 {
		return int(n)
	}
	return c.BatchSize
}

// IntKeySpan reads the smallest and largest value of the source's first key
// column when it is an integer. Both are nil for any other key type, and for
// an empty table.
func IntKeySpan(ctx context.Context, q pgsql.Querier, m rowmap.Mapping) (lo, hi *int64, err error) {
	switch m.SourceKeyTypes[0] {
	case "integer", "bigint", "smallint":
	default:
		return nil, nil, nil
	}
	err = q.QueryRow(ctx, fmt.Sprintf("SELECT min(%[1]s)::bigint, max(%[1]s)::bigint FROM ONLY %[2]s",
		pgsql.Ident(m.SourceKey[0]), m.Source.Quoted())).Scan(&lo, &hi)
	return lo, hi, err
}

// SplitRanges cuts the source key space into ranges for parallel workers. An
// integer first key column is cut into equal slices of [min, max]; any other
// key is one range.
func (c *Copier) SplitRanges(ctx context.Context, q pgsql.Querier, n int) ([]Range, error) {
	m := c.Mapping
	if n < 1 {
		n = 1
	}
	if n == 1 {
		return []Range{{No: 0}}, nil
	}
	lo, hi, err := IntKeySpan(ctx, q, m)
	if err != nil {
		return nil, fmt.Errorf("split ranges of %s: %w", m.Source, err)
	}
	if lo == nil || *hi-*lo < int64(n)*1000 {
		return []Range{{No: 0}}, nil
	}
	step := (*hi - *lo) / int64(n)
	ranges := make([]Range, n)
	prev := []string(nil)
	for i := 0; i < n; i++ {
		r := Range{No: i, Lower: prev}
		if i < n-1 {
			r.Upper = []string{fmt.Sprint(*lo + step*int64(i+1))}
			prev = r.Upper
		}
		ranges[i] = r
	}
	return ranges, nil
}

// Run copies every range that is not done, resuming from each one's
// checkpoint, with up to Workers ranges at a time (SetWorkers changes that
// while it runs; the pace lowers it while the application is busy).
//
// A worker over the number allowed now stops after its current batch and
// hands its range back, checkpointed, to whichever worker is allowed to
// take it: finishing the range first (an eighth of the table with the
// default two workers) kept the copy at twice its share for minutes after
// the application turned busy or an operator lowered the workers.
func (c *Copier) Run(ctx context.Context, ranges []Range, cp Checkpointer) error {
	if c.BatchSize <= 0 {
		c.BatchSize = 10000
	}
	if c.TargetBatchTime <= 0 {
		c.TargetBatchTime = 500 * time.Millisecond
	}
	c.limiter.rate = &c.MaxRowsPerSecond
	// Every range not done waits in queue, which has room for all of them,
	// so a range handed back never blocks; finished closes when the last is
	// done.
	queue := make(chan Range, len(ranges))
	for _, r := range ranges {
		if !r.Done {
			queue <- r
		}
	}
	var left atomic.Int64
	left.Store(int64(len(queue)))
	if left.Load() == 0 {
		return nil
	}
	finished := make(chan struct{})
	g, gctx := errgroup.WithContext(ctx)
	// One goroutine per range, so that raising the workers has someone to
	// run; those over the allowed number wait their turn.
	for w := 0; w < len(queue); w++ {
		g.Go(func() error {
			for {
				// Once no range is waiting, a worker over the limit is
				// not needed: the running ones (worker 0 always may run)
				// take any range handed back.
				if turn, err := pace.WaitTurn(gctx, c.paceNow, w, func() bool { return len(queue) == 0 }); !turn {
					return err
				}
				var r Range
				select {
				case r = <-queue:
				case <-finished:
					return nil
				case <-gctx.Done():
					return gctx.Err()
				}
				r, err := c.copyRange(gctx, r, cp, w)
				if err != nil {
					return err
				}
				if !r.Done {
					queue <- r
					continue
				}
				if left.Add(-1) == 0 {
					close(finished)
					return nil
				}
			}
		})
	}
	return g.Wait()
}

// SetWorkers changes how many workers may copy while the application is
// quiet; each applies it after its current batch.
func (c *Copier) SetWorkers(n int) { c.liveWorkers.Store(int64(n)) }

// paceNow is the pace with the worker count set now (SetWorkers, else
// Workers) while the application is quiet; while it is busy, the pace's
// (one) if that is fewer.
func (c *Copier) paceNow(ctx context.Context) pace.Pace {
	n := int(c.liveWorkers.Load())
	if n <= 0 {
		n = max(c.Workers, 1)
	}
	p := pace.Pace{Workers: n, Duty: 1}
	if c.Pace != nil {
		if p = c.Pace(ctx); !p.Busy {
			p.Workers = n
		}
		p.Workers = min(p.Workers, n)
	}
	return p
}

// copyRange copies r from its checkpoint as worker w, until it is done or w
// is no longer allowed to run; it returns the range as far as it got.
func (c *Copier) copyRange(ctx context.Context, r Range, cp Checkpointer, w int) (Range, error) {
	size := c.batchSize()
	// Two forms: the range's first batch has no lower bound. One statement
	// with "$1 IS NULL OR key > $1" would not use the index for the bound
	// once PostgreSQL switches to a generic plan, and every batch would scan
	// the range from its start.
	//
	// A batch is one statement when it locks blue's rows (batchSQL), and two
	// otherwise: its bounds (with the key buckets' locks when guarded), then
	// a plain INSERT up to the last key, whose count is its command tag.
	// Two statements cost one round trip more and save materializing the
	// inserted rows to count them (about 10 % of a batch's time).
	var stmts [2][2]string  // [withLower][form]
	var boundsSQL [2]string // [withLower]: the two-step form's keys (and locks)
	guarded := c.Guard != nil && !c.NoLock
	twoStep := guarded || c.NoLock
	for _, lower := range []bool{false, true} {
		for _, form := range []batchForm{plainInsert, onConflictNothing} {
			if twoStep {
				stmts[b2i(lower)][form] = c.boundedInsertSQL(r, lower, form)
			} else {
				stmts[b2i(lower)][form] = c.batchSQL(r, lower, form)
			}
		}
		if twoStep {
			boundsSQL[b2i(lower)] = c.boundsSQL(r, lower, guarded)
		}
	}
	// Batches start plain and switch to ON CONFLICT once one meets a row the
	// sync already wrote; they go back once such a batch finds none.
	form := plainInsert
	for !r.Done {
		withLower := r.Last != nil || r.Lower != nil
		if c.Gate != nil {
			if err := c.Gate(ctx); err != nil {
				return r, err
			}
		}
		// After the gate, which applies `shadowctl set workers`.
		if p := c.paceNow(ctx); w >= p.Workers {
			c.Log.Debug().Int("range", r.No).Int("worker", w).Int("workers", p.Workers).Msg("range handed back: fewer workers may copy now")
			return r, nil
		}
		size = min(size, c.batchSize())
		if err := c.limiter.wait(ctx, int64(size)); err != nil {
			return r, err
		}
		start := time.Now()
		var n, inserted int64
		var last []string
		err := c.retry(ctx, func() error {
			return pgx.BeginFunc(ctx, c.Pool, func(tx pgx.Tx) error {
				// A batch commits with its checkpoint, so a crash that loses
				// its commit loses both, and the batch is copied again: no
				// need to wait for the WAL flush (about 5 % of the copy's
				// time on the bench). A guarded batch starts under the
				// bucket locks' shorter timeout (takeBounds restores the
				// batch's).
				timeout := c.LockTimeout
				if guarded {
					timeout = c.guardLockTimeout()
				}
				if _, err := tx.Exec(ctx, pgsql.LocalLockTimeoutSQL(timeout)+"; SET LOCAL synchronous_commit = off"); err != nil {
					return err
				}
				if c.StartFailpoint != nil {
					if err := c.StartFailpoint(ctx, tx, r); err != nil {
						return err
					}
				}
				args := c.batchArgs(r, size)
				var err error
				if twoStep {
					n, last, err = c.takeBounds(ctx, tx, boundsSQL[b2i(withLower)], args, guarded)
					inserted = 0
					if err == nil && n > 0 {
						var tag pgconn.CommandTag
						tag, err = tx.Exec(ctx, stmts[b2i(withLower)][form], append(args, keyArgs(last)...)...)
						inserted = tag.RowsAffected()
					}
				} else {
					err = tx.QueryRow(ctx, stmts[b2i(withLower)][form], args...).Scan(&n, &inserted, &last)
				}
				if form == plainInsert && pgsql.Code(err) == pgsql.CodeUniqueViolation {
					// The sync wrote one of these rows first: its version
					// is newer. Redo the batch keeping it.
					form = onConflictNothing
					return errRedoBatch
				}
				if err != nil {
					return err
				}
				next := r
				next.Rows += n
				if n > 0 {
					next.Last = last
				}
				next.Done = n < int64(size)
				if c.Failpoint != nil {
					if err := c.Failpoint(ctx, next); err != nil {
						return err
					}
				}
				return cp.SaveRange(ctx, tx, next)
			})
		})
		if err != nil {
			if isDataError(err) {
				return r, c.explainBadRow(ctx, r, size, err)
			}
			return r, fmt.Errorf("copy %s → %s, range %d after key %v: %w", c.Mapping.Source, c.Mapping.Target, r.No, r.Last, err)
		}
		r.Rows += n
		if n > 0 {
			r.Last = last
		}
		r.Done = n < int64(size)
		if form == onConflictNothing && inserted == n {
			form = plainInsert
		}
		if c.Progress != nil {
			c.Progress(n)
		}
		took := time.Since(start)
		size = c.nextSize(size, took)
		c.Log.Debug().Int("range", r.No).Int64("rows", n).Int("next_batch", size).Dur("took", took).Msg("batch copied")
		if r.Done {
			break
		}
		p := c.paceNow(ctx)
		if c.busy.Swap(p.Busy) != p.Busy {
			if p.Busy {
				c.Log.Info().Int("workers", p.Workers).Float64("load_share", p.Duty).Msg("the application is busy: the copy steps back")
			} else {
				c.Log.Info().Int("workers", p.Workers).Msg("the application is quiet: the copy runs flat out")
			}
		}
		if err := p.RestAfter(ctx, took); err != nil {
			return r, err
		}
	}
	return r, nil
}

// nextSize adapts the batch size to the target time per batch.
func (c *Copier) nextSize(size int, took time.Duration) int {
	switch {
	case took > c.TargetBatchTime*3/2 && size > 100:
		size = size * 2 / 3
	case took < c.TargetBatchTime/3 && size < c.batchSize():
		size = min(size*3/2+1, c.batchSize())
	}
	return size
}

// errGuardBusy: an application transaction holds one of the batch's key
// buckets (it deleted a row there and has not ended).
var errGuardBusy = errors.New("the copy batch waited for its key-bucket locks")

// DefaultGuardPatience is how long a batch waits for its key buckets in
// all, unless Copier.GuardPatience says otherwise.
const DefaultGuardPatience = 5 * time.Minute

// errRedoBatch asks retry to run a batch again at once, in the form the
// failed attempt switched to.
var errRedoBatch = errors.New("redo the batch")

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// retry runs fn again after lock timeouts, deadlocks and serialization
// failures, with backoff and jitter.
//
// A batch that could not get its bucket locks (an application transaction
// that deleted a row in them is still open) waits as long as that takes, up
// to GuardPatience, without using up its attempts: each wait is short, so
// that the application's deletes never queue behind the batch for long.
func (c *Copier) retry(ctx context.Context, fn func() error) error {
	var err error
	var guardStart time.Time
	guardWaits := 0
	for attempt := 0; attempt < 20; attempt++ {
		if err = fn(); errors.Is(err, errRedoBatch) {
			attempt--
			continue
		}
		if errors.Is(err, errGuardBusy) {
			if guardStart.IsZero() {
				guardStart = time.Now()
			}
			patience := c.GuardPatience
			if patience <= 0 {
				patience = DefaultGuardPatience
			}
			if time.Since(guardStart) < patience {
				attempt--
				guardWaits++
				if werr := retry.Backoff(ctx, min(guardWaits, 5), 20*time.Millisecond, time.Second); werr != nil {
					return werr
				}
				// A long wait still notices a pause or an abort.
				if c.Gate != nil && guardWaits%8 == 0 {
					if gerr := c.Gate(ctx); gerr != nil {
						return gerr
					}
				}
				continue
			}
			return fmt.Errorf("%w for %s (long transactions deleting rows of the table? see pg_stat_activity)", err, patience)
		}
		if err == nil || !pgsql.IsRetryable(err) {
			return err
		}
		c.Log.Debug().Err(err).Int("attempt", attempt+1).Msg("batch retried")
		if werr := retry.Backoff(ctx, attempt, 20*time.Millisecond, 2*time.Second); werr != nil {
			return werr
		}
	}
	return err
}

// batchForm says how a batch writes green: plainInsert fails on a row that is
// already there (and the batch is redone as onConflictNothing); it is the
// fast path, because ON CONFLICT's speculative insertion costs about as much
// again as the insert itself (measured: 2M rows in 7.2 s plain, 11.2 s with
// ON CONFLICT DO NOTHING, one statement on an idle server).
type batchForm int

const (
	plainInsert batchForm = iota
	onConflictNothing
)

// batchSQL renders one batch: take the next keys of the range from the
// statement's snapshot (batch_keys), lock those rows against deletion and key
// change (FOR KEY SHARE), insert their mapping — under onConflictNothing
// unless the sync already put a newer version there — and report how many
// keys were read, rows inserted, and the last key read. Rows deleted before we
// lock them are skipped; rows deleted after wait for our commit and are then
// deleted from green by the sync. So a batch can neither resurrect a deleted
// row nor overwrite a newer one (plainInsert fails instead of overwriting).
//
// The locked rows are bounded by the last key of batch_keys, which is also
// the checkpoint: a row whose key a concurrent transaction changed while we
// waited for its lock comes back from FOR KEY SHARE as its new version (READ
// COMMITTED re-checks the newest version against the WHERE clause only);
// bounded, a row moved past the batch is skipped (the sync copies it under its
// new key), and its new key can never become the checkpoint, which would skip
// every row between the batch's end and that key. Rows are locked in key
// order by one index range scan, read straight into the INSERT: no
// intermediate result to materialize (which spilled to disk at work_mem).
func (c *Copier) batchSQL(r Range, withLower bool, form batchForm) string {
	m := c.Mapping
	n := len(m.SourceKey)
	where := func(alias string) string { return c.rangeWhere(r, withLower, alias) }
	// The CTE's own columns, qualified by its name: inside the subquery an
	// unqualified or alias-qualified key would be the outer row's, and the
	// bound would hold for every row.
	keysQ := m.SourceKeyList(keysCTE)
	desc := make([]string, n)
	lastArr := make([]string, n)
	for i, k := range m.SourceKey {
		desc[i] = keysCTE + "." + pgsql.Ident(k) + " DESC"
		lastArr[i] = keysCTE + "." + pgsql.Ident(k) + "::text"
	}
	lock := " FOR KEY SHARE OF " + pgsql.Ident(m.Alias)
	if c.NoLock {
		lock = ""
	}
	conflict := ""
	if form == onConflictNothing {
		conflict = " " + m.OnConflictDoNothing()
	}
	return fmt.Sprintf(`WITH %[2]s, ins AS (
  %[3]s WHERE %[4]s AND %[5]s <= (SELECT %[6]s FROM %[1]s ORDER BY %[7]s LIMIT 1)
   ORDER BY %[11]s%[8]s%[9]s RETURNING 1
)
SELECT (SELECT count(*) FROM %[1]s), (SELECT count(*) FROM ins), (SELECT ARRAY[%[10]s] FROM %[1]s ORDER BY %[7]s LIMIT 1)`,
		keysCTE, c.batchKeysCTE(r, withLower),
		m.InsertSelect("ONLY "+m.Source.Quoted()), where(m.Alias), m.SourceKeyList(m.Alias),
		bareList(keysQ), strings.Join(desc, ", "), lock, conflict,
		strings.Join(lastArr, ", "), bareList(m.SourceKeyList(m.Alias)))
}

// rangeWhere renders a batch's bounds over the source row named alias:
// $1..$n are the lower bound (checkpoint or range lower; without one they are
// NULL and only typed, as a constant condition), $n+2 the range's upper bound
// on the first key column.
func (c *Copier) rangeWhere(r Range, withLower bool, alias string) string {
	m := c.Mapping
	n := len(m.SourceKey)
	var conds []string
	if withLower {
		params := make([]string, n)
		for i, t := range m.SourceKeyTypes {
			params[i] = fmt.Sprintf("$%d::text::%s", i+1, t)
		}
		conds = append(conds, fmt.Sprintf("%s > (%s)", m.SourceKeyList(alias), strings.Join(params, ", ")))
	} else {
		nulls := make([]string, n)
		for i := range nulls {
			nulls[i] = fmt.Sprintf("$%d::text IS NULL", i+1)
		}
		conds = append(conds, "("+strings.Join(nulls, " AND ")+")")
	}
	if r.Upper != nil {
		conds = append(conds, fmt.Sprintf("%s.%s <= $%d::text::%s", pgsql.Ident(alias), pgsql.Ident(m.SourceKey[0]), n+2, m.SourceKeyTypes[0]))
	}
	return strings.Join(conds, " AND ")
}

// boundsSQL renders the two-step form's first statement: how many keys the
// batch takes (the first $n+1 after the lower bound, as in batchSQL) and its
// last key, and when guarded the bucket locks from the lower bound's bucket
// (-1 without one) up to the last key's, taken in ascending order (two
// batches that meet in a bucket wait for each other, never in a cycle). Its
// snapshot is taken before the locks, so it only fixes the batch's bounds;
// the rows are read by the next statement, whose snapshot follows the locks.
//
// A full batch's last key is its $n+1-th, read by one index scan that
// skips the keys before it (OFFSET): nothing is materialized, counted or
// sorted. Only a range's last batch, which has fewer keys, counts them and
// reads its last key backwards from the range's end. (The earlier form
// materialized the keys, counted them and sorted them for the last one: 4.3
// ms per batch of 10,000 against 1.5 ms, with the locks, by pgbench on the
// bench's table; 0.6 s of one core per 2,000,000 rows.)
func (c *Copier) boundsSQL(r Range, withLower, guarded bool) string {
	m := c.Mapping
	n := len(m.SourceKey)
	cols := bareList(m.SourceKeyList("b"))
	desc := make([]string, n)
	last := make([]string, n)
	for i, k := range m.SourceKey {
		desc[i] = "b." + pgsql.Ident(k) + " DESC"
		last[i] = "l." + pgsql.Ident(k) + "::text"
	}
	where := c.rangeWhere(r, withLower, "b")
	locks := ""
	if guarded {
		g := c.Guard
		from := "-1"
		if withLower {
			from = g.Bucket(fmt.Sprintf("$1::text::%s", m.SourceKeyTypes[0]))
		}
		locks = fmt.Sprintf(",\n  (SELECT count(pg_advisory_xact_lock(%d, bucket)) FROM generate_series(%s, (SELECT %s FROM last_key AS l)) AS bucket)",
			g.Class, from, g.Bucket("l."+pgsql.Ident(g.Column)))
	}
	src := "ONLY " + m.Source.Quoted()
	return fmt.Sprintf(`WITH nth_key AS MATERIALIZED (
  SELECT %[1]s FROM %[2]s AS b WHERE %[3]s ORDER BY %[1]s OFFSET $%[4]d::bigint - 1 LIMIT 1
), last_key AS MATERIALIZED (
  SELECT * FROM nth_key
  UNION ALL
  SELECT * FROM (SELECT %[1]s FROM %[2]s AS b WHERE %[3]s AND NOT EXISTS (SELECT FROM nth_key) ORDER BY %[5]s LIMIT 1) AS tail_end
)
SELECT CASE WHEN EXISTS (SELECT FROM nth_key) THEN $%[4]d::bigint
  ELSE (SELECT count(*) FROM %[2]s AS b WHERE %[3]s) END,
  (SELECT ARRAY[%[6]s] FROM last_key AS l)%[7]s`,
		cols, src, where, n+1, strings.Join(desc, ", "), strings.Join(last, ", "), locks)
}

// keysCTE is the name of a batch's keys in its statements.
const keysCTE = "batch_keys"

// batchKeysCTE renders a batch's keys: the first $n+1 keys of the range after its
// lower bound ($1..$n), read once (MATERIALIZED) by one index range scan.
func (c *Copier) batchKeysCTE(r Range, withLower bool) string {
	m := c.Mapping
	cols := bareList(m.SourceKeyList("b"))
	return fmt.Sprintf("%s AS MATERIALIZED (\n  SELECT %s FROM ONLY %s AS b WHERE %s ORDER BY %s LIMIT $%d\n)",
		keysCTE, cols, m.Source.Quoted(), c.rangeWhere(r, withLower, "b"), cols, len(m.SourceKey)+1)
}

// takeBounds runs boundsSQL; guarded, in a transaction set to
// guardLockTimeout, and restores the batch's lock_timeout for what follows.
func (c *Copier) takeBounds(ctx context.Context, tx pgx.Tx, sql string, args []any, guarded bool) (n int64, last []string, err error) {
	if !guarded {
		err := tx.QueryRow(ctx, sql, args...).Scan(&n, &last)
		return n, last, err
	}
	var locks int64
	if err := tx.QueryRow(ctx, sql, args...).Scan(&n, &last, &locks); err != nil {
		if pgsql.IsLockTimeout(err) {
			return 0, nil, fmt.Errorf("%w: %w", errGuardBusy, err)
		}
		return 0, nil, err
	}
	return n, last, pgsql.SetLocalLockTimeout(ctx, tx, c.LockTimeout)
}

// boundedInsertSQL renders the two-step form's second statement: the mapped
// rows after the lower bound up to the last key the first statement read
// ($n+2+u.., u = 1 with an upper bound), unlocked. Guarded, a row deleted
// from here on is deleted from green by the sync once the batch commits (its
// trigger waits for the bucket); one deleted before is not in this
// statement's snapshot, which follows the locks. $n+1 (the batch size) is not
// needed here, only typed.
func (c *Copier) boundedInsertSQL(r Range, withLower bool, form batchForm) string {
	m := c.Mapping
	n := len(m.SourceKey)
	first := n + 2 + b2i(r.Upper != nil)
	params := make([]string, n)
	for i, t := range m.SourceKeyTypes {
		params[i] = fmt.Sprintf("$%d::text::%s", first+i, t)
	}
	conflict := ""
	if form == onConflictNothing {
		conflict = " " + m.OnConflictDoNothing()
	}
	key := m.SourceKeyList(m.Alias)
	return fmt.Sprintf(`%s WHERE %s AND %s <= (%s) AND $%d::bigint > 0 ORDER BY %s%s`,
		m.InsertSelect("ONLY "+m.Source.Quoted()), c.rangeWhere(r, withLower, m.Alias), key,
		strings.Join(params, ", "), n+1, bareList(key), conflict)
}

func (c *Copier) guardLockTimeout() time.Duration {
	return max(c.GuardLockTimeout, 10*time.Millisecond)
}

func keyArgs(k []string) []any {
	out := make([]any, len(k))
	for i, v := range k {
		out[i] = v
	}
	return out
}

func (c *Copier) batchArgs(r Range, size int) []any {
	n := len(c.Mapping.SourceKey)
	args := make([]any, 0, n+2)
	from := r.Last
	if from == nil {
		from = r.Lower
	}
	for i := 0; i < n; i++ {
		if from == nil {
			args = append(args, nil)
		} else {
			args = append(args, from[i])
		}
	}
	args = append(args, size)
	if r.Upper != nil {
		args = append(args, r.Upper[0])
	}
	return args
}

// isDataError reports errors about a row's values (classes 22 and 23), other
// than the unique violations the copy's ON CONFLICT absorbs.
func isDataError(err error) bool {
	code := pgsql.Code(err)
	return strings.HasPrefix(code, "22") || (strings.HasPrefix(code, "23") && code != pgsql.CodeUniqueViolation)
}

// explainBadRow finds the first row of a failed batch whose conversion fails,
// so the operator sees its key next to PostgreSQL's error.
func (c *Copier) explainBadRow(ctx context.Context, r Range, size int, batchErr error) error {
	m := c.Mapping
	tx, err := c.Pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("%w: %s", ErrBadRow, pgsql.Describe(batchErr))
	}
	defer tx.Rollback(ctx)
	keyCols := bareList(m.SourceKeyList(""))
	rows, err := tx.Query(ctx, fmt.Sprintf(`SELECT ARRAY[%s] FROM (%s) s`, textArray(m.SourceKey),
		fmt.Sprintf("SELECT %s FROM ONLY %s AS b WHERE ($1::text IS NULL OR %s > (%s)) ORDER BY %s LIMIT $%d",
			keyCols, m.Source.Quoted(), m.SourceKeyList("b"), placeholders(m.SourceKeyTypes), keyCols, len(m.SourceKey)+1)),
		c.batchArgs(Range{Last: r.Last, Lower: r.Lower}, size)...)
	if err != nil {
		return fmt.Errorf("%w: %s", ErrBadRow, pgsql.Describe(batchErr))
	}
	keys, err := pgx.CollectRows(rows, pgx.RowTo[[]string])
	if err != nil {
		return fmt.Errorf("%w: %s", ErrBadRow, pgsql.Describe(batchErr))
	}
	one := fmt.Sprintf("%s %s", m.InsertSelect(fmt.Sprintf("(SELECT * FROM ONLY %s AS b WHERE %s = (%s))", m.Source.Quoted(), m.SourceKeyList("b"), placeholders(m.SourceKeyTypes))), m.OnConflictDoNothing())
	for _, k := range keys {
		args := make([]any, len(k))
		for i := range k {
			args[i] = k[i]
		}
		if _, err := tx.Exec(ctx, "SAVEPOINT probe"); err != nil {
			break
		}
		if _, err := tx.Exec(ctx, one, args...); err != nil {
			return fmt.Errorf("%w: row of %s with key (%s) = (%s): %s", ErrBadRow, m.Source, strings.Join(m.SourceKey, ", "), strings.Join(k, ", "), pgsql.Describe(err))
		}
		if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT probe"); err != nil {
			break
		}
	}
	return fmt.Errorf("%w: a row of %s after key %v: %s", ErrBadRow, m.Source, r.Last, pgsql.Describe(batchErr))
}

func textArray(cols []string) string {
	parts := make([]string, len(cols))
	for i, c := range cols {
		parts[i] = pgsql.Ident(c) + "::text"
	}
	return strings.Join(parts, ", ")
}

func placeholders(types []string) string {
	parts := make([]string, len(types))
	for i, t := range types {
		parts[i] = fmt.Sprintf("$%d::text::%s", i+1, t)
	}
	return strings.Join(parts, ", ")
}

// rateLimiter spaces batches so that rows per second stay under the cap.
type rateLimiter struct {
	rate *atomic.Int64
	mu   stdsync.Mutex
	next time.Time
}

func (l *rateLimiter) wait(ctx context.Context, rows int64) error {
	if l.rate == nil {
		return nil
	}
	rate := l.rate.Load()
	if rate <= 0 {
		return nil
	}
	l.mu.Lock()
	now := time.Now()
	if l.next.Before(now) {
		l.next = now
	}
	at := l.next
	l.next = l.next.Add(time.Duration(float64(rows) / float64(rate) * float64(time.Second)))
	l.mu.Unlock()
	return retry.Sleep(ctx, time.Until(at))
}

// bareList drops the parentheses around a column list, for ORDER BY and
// SELECT lists.
func bareList(list string) string {
	return strings.TrimSuffix(strings.TrimPrefix(list, "("), ")")
}

// Package cutover owns the end of a blue-green migration: proving that green
// holds exactly the mapping of blue (counts and chunked checksums, with
// chunk repair), the atomic view swap under a short lock, the rollback to
// blue, and finalize. It acts on what the shadow package planned and
// persisted; it does not decide when.
package cutover

import (
	"context"
	"errors"
	"fmt"
	"strings"
	gosync "sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/pace"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/retry"
	"github.com/shadowctl/shadowctl/internal/rowmap"
	"golang.org/x/sync/errgroup"
)

// ErrMismatch means green differs from the mapping of blue and repair did not
// fix it.
var ErrMismatch = errors.New("green does not match blue")

// ErrLockedCatchUpTooSlow means the quiet compare (asynchronous sync) could
// not catch green up within LockedCatchUpBudget while it held blue's SHARE
// lock, attempt after attempt; each time it let the lock go.
var ErrLockedCatchUpTooSlow = errors.New("green's apply did not catch up while blue was locked for the quiet compare")

// DefaultLockedCatchUpBudget bounds the quiet compare's catch-up under
// blue's SHARE lock, the application's writes to blue waiting meanwhile;
// the same as the logical cutover's stall budget.
const DefaultLockedCatchUpBudget = 2 * time.Second

// VerifyResult is what a verification found.
type VerifyResult struct {
	Rows          int64   `json:"rows"`
	Chunks        int     `json:"chunks"`
	Mismatched    int     `json:"mismatched_chunks"`
	Repaired      int     `json:"repaired_chunks"`
	Seconds       float64 `json:"seconds"`
	OK            bool    `json:"ok"`
	FirstMismatch string  `json:"first_mismatch,omitempty"`
	// CatchUps counts the catch-ups that served lagging chunks
	// (asynchronous sync only).
	CatchUps int    `json:"catch_ups,omitempty"`
	At       string `json:"at"`
}

// Verifier compares a target table with the mapping of its source, chunk by
// chunk along the source key. Each chunk's two sides are read by one
// statement, so they share one snapshot: with a synchronous (trigger) sync
// both sides agree at every snapshot, whatever the application is doing.
type Verifier struct {
	Pool      *pgxpool.Pool
	Mapping   rowmap.Mapping
	ChunkRows int
	Workers   int
	// Repair re-copies a chunk that differs and checks it again.
	Repair      bool
	LockTimeout time.Duration
	// Chunked is false when the target cannot be searched by the source key
	// in the same order; the whole table is then one chunk.
	Chunked bool
	// CatchUp, set for an asynchronous (logical) sync, waits until the target
	// has applied every change made to the source so far. A chunk that
	// differs is then compared again after catching up, and finally under a
	// SHARE lock on the source (writes wait, briefly) after catching up, so a
	// difference that is only replication lag is never taken for a mismatch.
	CatchUp func(ctx context.Context) error
	// LockedCatchUpBudget bounds the catch-up that the quiet compare runs
	// under blue's SHARE lock, writers to blue waiting for it (zero:
	// DefaultLockedCatchUpBudget). Past it the lock is let go, and the quiet
	// compare is tried again from a fresh catch-up without the lock.
	LockedCatchUpBudget time.Duration
	// Gate, when set, is called before each chunk; an error stops the run.
	Gate func(ctx context.Context) error
	// Pace, when set, says how many of the Workers may compare now and on
	// what duty cycle (one, resting between chunks, while the application
	// is busy).
	Pace pace.Func
	Log  zerolog.Logger

	quiet gosync.Mutex
	// byText hashes rows through their text form: for column types without
	// an extended hash function (json, point, ...), where hashing the record
	// itself is refused.
	byText bool
}

// rowHash renders the 64-bit hash of a row record. Hashing the record with
// each type's own hash function skips the text conversion of every value
// (about twice as fast); equal values hash equal either way, since both
// sides carry the target's types.
func (v *Verifier) rowHash(record string) string {
	if v.byText {
		return "hashtextextended((" + record + ")::text, 0)"
	}
	return "hash_record_extended(" + record + ", 0)"
}

// chooseHash probes whether the target's row records can be hashed directly
// (the hash functions are looked up when a row is hashed, so the probe hashes
// one; an empty target is verified through text, which always works).
func (v *Verifier) chooseHash(ctx context.Context) {
	var n int
	err := v.Pool.QueryRow(ctx, fmt.Sprintf("SELECT count(%s) FROM (SELECT * FROM ONLY %s LIMIT 1) AS t", v.rowHash(v.Mapping.RowDigestTarget("t")), v.Mapping.Target.Quoted())).Scan(&n)
	v.byText = err != nil || n == 0
}

type chunk struct {
	lower, upper []string // exclusive, inclusive; nil = unbounded
}

// Run verifies the whole table.
//
// With CatchUp set (an asynchronous sync), a chunk that differs is not
// waited for on its own: it joins a queue of lagging chunks, and the
// workers go on with fresh ones. The queue is compared again after one
// catch-up serves all of it (when it holds recheckBatch chunks, when its
// oldest has waited recheckAfter, or when no fresh chunk is left). Under
// load nearly every chunk differs at first (the stream is a few hundred
// milliseconds behind), and one catch-up per chunk made the catch-ups most
// of the verification's time.
func (v *Verifier) Run(ctx context.Context) (VerifyResult, error) {
	start := time.Now()
	res := VerifyResult{}
	if v.ChunkRows <= 0 {
		v.ChunkRows = 20000
	}
	v.chooseHash(ctx)
	chunks := make(chan chunk)
	var rows, nchunks, mismatched, repaired, catchUps atomic.Int64
	var first atomic.Pointer[string]
	lag := newLagQueue()
	g, gctx := errgroup.WithContext(ctx)
	var walked atomic.Bool
	g.Go(func() error {
		defer walked.Store(true)
		defer close(chunks)
		return v.walkChunks(gctx, chunks, lag)
	})
	// settle takes a chunk that still differs after its catch-ups to the
	// quiet compare (asynchronous sync), then to repair.
	settle := func(c chunk, n int64, ok bool, desc string) error {
		var err error
		if !ok && v.CatchUp != nil {
			if n, ok, desc, err = v.compareQuiet(gctx, c); err != nil {
				return err
			}
		}
		if !ok {
			mismatched.Add(1)
			first.CompareAndSwap(nil, &desc)
			if v.Repair {
				if err := v.repair(gctx, c); err != nil {
					return err
				}
				if n, ok, desc, err = v.compare(gctx, c); err != nil {
					return err
				}
				if !ok {
					return fmt.Errorf("%w after repair: %s", ErrMismatch, desc)
				}
				repaired.Add(1)
				v.Log.Warn().Str("chunk", desc).Msg("chunk differed and was repaired")
			}
		}
		rows.Add(n)
		return nil
	}
	// rest paces a worker after work that began at started; a batch's
	// catch-up counts as its work: the apply runs flat out for it.
	rest := func(started time.Time) error {
		if v.Pace == nil {
			return nil
		}
		return v.Pace(gctx).RestAfter(gctx, time.Since(started))
	}
	recheck := func(batch []laggingChunk) error {
		defer lag.release(len(batch))
		started := time.Now()
		if err := v.CatchUp(gctx); err != nil {
			return err
		}
		catchUps.Add(1)
		for _, l := range batch {
			if v.Gate != nil {
				if err := v.Gate(gctx); err != nil {
					return err
				}
			}
			n, ok, desc, err := v.compare(gctx, l.c)
			if err != nil {
				return err
			}
			switch {
			case ok:
				rows.Add(n)
			case l.tries+1 < maxCatchUps:
				lag.add(laggingChunk{c: l.c, tries: l.tries + 1})
			default:
				if err := settle(l.c, n, ok, desc); err != nil {
					return err
				}
			}
		}
		return rest(started)
	}
	fresh := func(c chunk) error {
		defer lag.release(1)
		started := time.Now()
		if v.Gate != nil {
			if err := v.Gate(gctx); err != nil {
				return err
			}
		}
		n, ok, desc, err := v.compare(gctx, c)
		if err != nil {
			return err
		}
		nchunks.Add(1)
		if !ok && v.CatchUp != nil {
			lag.add(laggingChunk{c: c})
		} else if err := settle(c, n, ok, desc); err != nil {
			return err
		}
		return rest(started)
	}
	for w := 0; w < max(v.Workers, 1); w++ {
		g.Go(func() error {
			src := (<-chan chunk)(chunks)
			for {
				// A worker over the current pace takes no chunk. Worker 0
				// always may (the pace allows at least one): it finishes
				// the lagging chunks when the others have left.
				if turn, err := pace.WaitTurn(gctx, v.Pace, w, walked.Load); !turn {
					return err
				}
				if batch := lag.takeDue(src == nil); batch != nil {
					if err := recheck(batch); err != nil {
						return err
					}
					continue
				}
				if src == nil {
					if w > 0 {
						return nil
					}
					changed, done := lag.settled()
					if done {
						return nil
					}
					select {
					case <-changed:
					case <-gctx.Done():
						return gctx.Err()
					}
					continue
				}
				var due <-chan time.Time
				var timer *time.Timer
				if d, ok := lag.dueIn(); ok {
					timer = time.NewTimer(d)
					due = timer.C
				}
				var c chunk
				more, got := true, false
				select {
				case c, more = <-src:
					got = more
				case <-due:
				case <-gctx.Done():
				}
				if timer != nil {
					timer.Stop()
				}
				if err := gctx.Err(); err != nil {
					return err
				}
				if !more {
					src = nil
				}
				if got {
					if err := fresh(c); err != nil {
						return err
					}
				}
			}
		})
	}
	err := g.Wait()
	if _, done := lag.settled(); err == nil && !done {
		// Never reached: every queued chunk is compared by a worker still
		// running. Checked because a chunk left here would pass unverified.
		err = fmt.Errorf("verify %s: lagging chunks were left uncompared", v.Mapping.Target)
	}
	res.Rows, res.Chunks = rows.Load(), int(nchunks.Load())
	res.Mismatched, res.Repaired = int(mismatched.Load()), int(repaired.Load())
	res.CatchUps = int(catchUps.Load())
	if p := first.Load(); p != nil {
		res.FirstMismatch = *p
	}
	res.Seconds = time.Since(start).Seconds()
	res.At = time.Now().UTC().Format(time.RFC3339)
	if err != nil {
		return res, err
	}
	res.OK = res.Mismatched == res.Repaired
	if !res.OK {
		return res, fmt.Errorf("%w: %d of %d chunks differ, first: %s", ErrMismatch, res.Mismatched, res.Chunks, res.FirstMismatch)
	}
	return res, nil
}

// Lagging chunks (asynchronous sync): see Run.
const (
	// recheckBatch and recheckAfter: when the queue is compared again. A
	// catch-up costs a synchronously committed mark and at least one of the
	// apply's commits (every 50 ms while awaited).
	recheckBatch = 8
	recheckAfter = 500 * time.Millisecond
	// maxCatchUps: a chunk still differing after this many catch-ups is
	// compared under a SHARE lock on blue (compareQuiet).
	maxCatchUps = 3
)

// laggingChunk is a chunk that differed, waiting for a catch-up.
type laggingChunk struct {
	c     chunk
	tries int // catch-ups it has had
	since time.Time
}

// lagQueue holds the lagging chunks, and counts the chunks workers hold
// (fresh or in a batch) so the last worker knows when nothing can join the
// queue any more.
type lagQueue struct {
	mu      gosync.Mutex
	items   []laggingChunk
	held    int
	changed chan struct{} // signalled when held drops or items grow
}

func newLagQueue() *lagQueue { return &lagQueue{changed: make(chan struct{}, 1)} }

func (q *lagQueue) signal() {
	select {
	case q.changed <- struct{}{}:
	default:
	}
}

func (q *lagQueue) hold() {
	q.mu.Lock()
	q.held++
	q.mu.Unlock()
}

func (q *lagQueue) release(n int) {
	q.mu.Lock()
	q.held -= n
	q.mu.Unlock()
	q.signal()
}

func (q *lagQueue) add(l laggingChunk) {
	l.since = time.Now()
	q.mu.Lock()
	q.items = append(q.items, l)
	q.mu.Unlock()
	q.signal()
}

// takeDue hands out the whole queue, held by the caller until released,
// when it is due (or force and not empty).
func (q *lagQueue) takeDue(force bool) []laggingChunk {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) == 0 || !(force || len(q.items) >= recheckBatch || time.Since(q.items[0].since) >= recheckAfter) {
		return nil
	}
	batch := q.items
	q.items = nil
	q.held += len(batch)
	return batch
}

// dueIn is how long until the queue is due; false when it is empty.
func (q *lagQueue) dueIn() (time.Duration, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) == 0 {
		return 0, false
	}
	return max(recheckAfter-time.Since(q.items[0].since), time.Millisecond), true
}

// settled reports whether no chunk is queued or held; if not, the channel
// to wait on for a change.
func (q *lagQueue) settled() (<-chan struct{}, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.changed, len(q.items) == 0 && q.held == 0
}

// walkChunks cuts the source key space into chunks of about ChunkRows rows.
// Each chunk is counted as held (lag) before it is sent, so that no worker
// can find the walk over and nothing held while a chunk is between the
// walker and a worker.
func (v *Verifier) walkChunks(ctx context.Context, out chan<- chunk, lag *lagQueue) error {
	send := func(c chunk) error {
		lag.hold()
		select {
		case out <- c:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if !v.Chunked {
		return send(chunk{})
	}
	m := v.Mapping
	keyCols := strings.Join(quoteAll(m.SourceKey), ", ")
	// Two forms, as in rangeCond: the first chunk has no lower bound.
	form := func(lower string) string {
		return fmt.Sprintf(`SELECT ARRAY[%s] FROM ONLY %s AS b WHERE %s ORDER BY %s OFFSET $%d LIMIT 1`,
			textArray(m.SourceKey), m.Source.Quoted(), lower, keyCols, len(m.SourceKey)+1)
	}
	nulls := make([]string, len(m.SourceKey))
	for i := range nulls {
		nulls[i] = fmt.Sprintf("$%d::text IS NULL", i+1)
	}
	firstQ, nextQ := form("("+strings.Join(nulls, " AND ")+")"), form(fmt.Sprintf("(%s) > (%s)", keyCols, placeholders(m.SourceKeyTypes, 1)))
	var lower []string
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		var upper []string
		q := nextQ
		if lower == nil {
			q = firstQ
		}
		err := v.Pool.QueryRow(ctx, q, append(keyArgs(lower, len(m.SourceKey)), v.ChunkRows-1)...).Scan(&upper)
		if errors.Is(err, pgx.ErrNoRows) {
			return send(chunk{lower: lower})
		}
		if err != nil {
			return fmt.Errorf("verify %s: chunk bounds: %w", m.Target, err)
		}
		if err := send(chunk{lower: lower, upper: upper}); err != nil {
			return err
		}
		lower = upper
	}
}

// compare checks one chunk: count and XOR of row hashes on both sides, read
// by one statement (one snapshot).
func (v *Verifier) compare(ctx context.Context, c chunk) (rows int64, ok bool, desc string, err error) {
	return v.compareOn(ctx, v.Pool, c)
}

func (v *Verifier) compareOn(ctx context.Context, q pgsql.Querier, c chunk) (rows int64, ok bool, desc string, err error) {
	m := v.Mapping
	n := len(m.SourceKey)
	srcWhere, tgtWhere := v.rangeCond(c)
	sql := fmt.Sprintf(`SELECT s.n, s.h, t.n, t.h FROM
  (SELECT count(*) AS n, coalesce(bit_xor(%s), 0) AS h FROM ONLY %s AS %s WHERE %s) s,
  (SELECT count(*) AS n, coalesce(bit_xor(%s), 0) AS h FROM ONLY %s AS t WHERE %s) t`,
		v.rowHash(m.RowDigestSource()), m.Source.Quoted(), pgsql.Ident(m.Alias), srcWhere,
		v.rowHash(m.RowDigestTarget("t")), m.Target.Quoted(), tgtWhere)
	args := append(keyArgs(c.lower, n), keyArgs(c.upper, n)...)
	var sn, tn, sh, th int64
	if err := q.QueryRow(ctx, sql, args...).Scan(&sn, &sh, &tn, &th); err != nil {
		return 0, false, "", fmt.Errorf("verify %s: %w", m.Target, err)
	}
	desc = fmt.Sprintf("keys (%v, %v]: blue %d rows, green %d rows", fmtKey(c.lower), fmtKey(c.upper), sn, tn)
	if sn == tn && sh == th {
		return sn, true, desc, nil
	}
	if sn == tn {
		desc += ", same count but different values"
	}
	return sn, false, desc, nil
}

// compareQuiet compares a chunk while the source takes no writes (SHARE
// lock under lock_timeout) after the target caught up; with Repair it also
// repairs it there, since the sync has nothing left to apply.
func (v *Verifier) compareQuiet(ctx context.Context, c chunk) (rows int64, ok bool, desc string, err error) {
	// One quiet compare at a time: a second SHARE request would queue behind
	// the writers that wait for the first.
	v.quiet.Lock()
	defer v.quiet.Unlock()
	for attempt := 0; ; attempt++ {
		// Catch up first, so the lock is held only for the last few changes.
		if err := v.CatchUp(ctx); err != nil {
			return 0, false, "", err
		}
		rows, ok, desc, err = v.compareQuietOnce(ctx, c)
		if err == nil || !(pgsql.IsRetryable(err) || errors.Is(err, ErrLockedCatchUpTooSlow)) || attempt >= 20 {
			return rows, ok, desc, err
		}
		v.Log.Debug().Err(err).Int("attempt", attempt+1).Msg("quiet compare: lock busy or catch-up too slow under it, retrying")
		if werr := retry.Backoff(ctx, attempt, 20*time.Millisecond, time.Second); werr != nil {
			return 0, false, "", werr
		}
	}
}

func (v *Verifier) compareQuietOnce(ctx context.Context, c chunk) (rows int64, ok bool, desc string, err error) {
	err = pgx.BeginFunc(ctx, v.Pool, func(tx pgx.Tx) error {
		if err := pgsql.SetLocalLockTimeout(ctx, tx, max(v.LockTimeout, 100*time.Millisecond)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "LOCK TABLE ONLY "+v.Mapping.Source.Quoted()+" IN SHARE MODE"); err != nil {
			return err
		}
		// Writers to blue wait from here until the commit: the catch-up,
		// which waits on the apply, gets a budget.
		budget := v.LockedCatchUpBudget
		if budget <= 0 {
			budget = DefaultLockedCatchUpBudget
		}
		lctx, cancel := context.WithTimeout(ctx, budget)
		err := v.CatchUp(lctx)
		cancel()
		if err != nil {
			if ctx.Err() == nil && lctx.Err() != nil {
				return fmt.Errorf("%w (within %s; keys (%v, %v])", ErrLockedCatchUpTooSlow, budget, fmtKey(c.lower), fmtKey(c.upper))
			}
			return err
		}
		rows, ok, desc, err = v.compareOn(ctx, tx, c)
		if err != nil || ok || !v.Repair {
			return err
		}
		if err := v.repairOn(ctx, tx, c); err != nil {
			return err
		}
		rows, ok, desc, err = v.compareOn(ctx, tx, c)
		if ok {
			desc += " (repaired)"
		}
		return err
	})
	return rows, ok, desc, err
}

// rangeCond renders the chunk's bounds over the source and target key:
// $1..$n lower, $n+1..$2n upper. A missing bound's parameters are NULL and
// only typed (a constant condition): "$1 IS NULL OR key > $1" would lose the
// index once PostgreSQL plans the statement generically.
func (v *Verifier) rangeCond(c chunk) (src, tgt string) {
	m := v.Mapping
	n := len(m.SourceKey)
	srcKey := m.SourceKeyList(m.Alias)
	tgtKey := qualified("t", m.MatchColumns())
	lowerS, upperS := placeholders(m.SourceKeyTypes, 1), placeholders(m.SourceKeyTypes, n+1)
	unset := func(from int) string {
		parts := make([]string, n)
		for i := range parts {
			parts[i] = fmt.Sprintf("$%d::text IS NULL", from+i)
		}
		return "(" + strings.Join(parts, " AND ") + ")"
	}
	cond := func(key string) string {
		lower, upper := unset(1), unset(n+1)
		if c.lower != nil {
			lower = fmt.Sprintf("%s > (%s)", key, lowerS)
		}
		if c.upper != nil {
			upper = fmt.Sprintf("%s <= (%s)", key, upperS)
		}
		return lower + " AND " + upper
	}
	return cond(srcKey), cond(tgtKey)
}

// repair replaces a chunk of green with the mapping of blue. Blue's rows of
// the chunk are locked first (FOR SHARE), so writers to them wait before their
// sync touches green: no deadlock with the application.
func (v *Verifier) repair(ctx context.Context, c chunk) error {
	m := v.Mapping
	n := len(m.SourceKey)
	srcWhere, _ := v.rangeCond(c)
	args := append(keyArgs(c.lower, n), keyArgs(c.upper, n)...)
	return pgx.BeginFunc(ctx, v.Pool, func(tx pgx.Tx) error {
		if err := pgsql.SetLocalLockTimeout(ctx, tx, max(v.LockTimeout, time.Second)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf("SELECT 1 FROM ONLY %s AS %s WHERE %s FOR SHARE", m.Source.Quoted(), pgsql.Ident(m.Alias), srcWhere), args...); err != nil {
			return fmt.Errorf("repair %s: lock blue rows: %w", m.Target, err)
		}
		return v.repairOn(ctx, tx, c)
	})
}

// repairOn replaces the chunk of the target with the mapping of the source.
func (v *Verifier) repairOn(ctx context.Context, tx pgx.Tx, c chunk) error {
	m := v.Mapping
	n := len(m.SourceKey)
	srcWhere, tgtWhere := v.rangeCond(c)
	args := append(keyArgs(c.lower, n), keyArgs(c.upper, n)...)
	if _, err := tx.Exec(ctx, fmt.Sprintf("DELETE FROM ONLY %s AS t WHERE %s", m.Target.Quoted(), tgtWhere), args...); err != nil {
		return fmt.Errorf("repair %s: %w", m.Target, err)
	}
	ins := fmt.Sprintf("%s WHERE %s %s", m.InsertSelect("ONLY "+m.Source.Quoted()), srcWhere, m.OnConflictDoNothing())
	if _, err := tx.Exec(ctx, ins, args...); err != nil {
		return fmt.Errorf("repair %s: %w", m.Target, err)
	}
	return nil
}

func keyArgs(k []string, n int) []any {
	out := make([]any, n)
	for i := range out {
		if k != nil {
			out[i] = k[i]
		}
	}
	return out
}

func fmtKey(k []string) string {
	if k == nil {
		return "∞"
	}
	return strings.Join(k, ",")
}

func quoteAll(cols []string) []string {
	out := make([]string, len(cols))
	for i, c := range cols {
		out[i] = pgsql.Ident(c)
	}
	return out
}

func qualified(alias string, cols []string) string {
	out := make([]string, len(cols))
	for i, c := range cols {
		out[i] = pgsql.Ident(alias) + "." + pgsql.Ident(c)
	}
	return "(" + strings.Join(out, ", ") + ")"
}

func textArray(cols []string) string {
	parts := make([]string, len(cols))
	for i, c := range cols {
		parts[i] = pgsql.Ident(c) + "::text"
	}
	return strings.Join(parts, ", ")
}

func placeholders(types []string, from int) string {
	parts := make([]string, len(types))
	for i, t := range types {
		parts[i] = fmt.Sprintf("$%d::text::%s", from+i, t)
	}
	return strings.Join(parts, ", ")
}

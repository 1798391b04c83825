package demo

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// emailState is what the load knows of a row's customer_email, a column it
// never writes: green's forward sync fills it from customers whenever blue
// writes the row, and a row inserted through the view over green gets NULL (an
// application that is not yet updated for the new column does just that).
type emailState uint8

const (
	// emailMapped: the customer's email.
	emailMapped emailState = iota
	// emailNull: NULL (inserted through the view over green, not rewritten
	// through blue since).
	emailNull
	// emailEither: the write happened while a swap was in flight, so the
	// client cannot know which side took it: NULL or the customer's email.
	emailEither
)

// orderRow is what the load knows of one orders row.
type orderRow struct {
	CustomerID  int
	AmountCents int64
	Status      string
	Email       emailState
}

// side is which table serves public.orders while no swap is in flight. A new
// value is stored at every swap boundary; an operation that saw the same
// pointer before and after itself, not swapping, knows which side took it.
type side struct {
	green    bool
	swapping bool
}

// PhaseStats measures the load during one step of the scenario. Operations
// count in the phase in which they started.
type PhaseStats struct {
	Name       string
	Start, End time.Time
	ops, errs  atomic.Int64
	mu         sync.Mutex
	maxLat     time.Duration
	maxOp      string
}

// Ops is the number of successful operations.
func (p *PhaseStats) Ops() int64 { return p.ops.Load() }

// Errors is the number of failed operations.
func (p *PhaseStats) Errors() int64 { return p.errs.Load() }

// MaxLatency is the slowest operation (successful or not).
func (p *PhaseStats) MaxLatency() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.maxLat
}

// SlowestOp names the slowest operation.
func (p *PhaseStats) SlowestOp() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.maxOp
}

// Duration is the phase's wall time.
func (p *PhaseStats) Duration() time.Duration {
	end := p.End
	if end.IsZero() {
		end = time.Now()
	}
	return end.Sub(p.Start)
}

// TPS is successful operations per second.
func (p *PhaseStats) TPS() float64 {
	if d := p.Duration().Seconds(); d > 0 {
		return float64(p.Ops()) / d
	}
	return 0
}

func (p *PhaseStats) record(op string, lat time.Duration, failed bool) {
	if failed {
		p.errs.Add(1)
	} else {
		p.ops.Add(1)
	}
	p.mu.Lock()
	if lat > p.maxLat {
		p.maxLat, p.maxOp = lat, op
	}
	p.mu.Unlock()
}

// Load is a set of clients writing through public.orders the way an
// application does — INSERT ... RETURNING, UPDATE by id, DELETE, SELECT ...
// FOR UPDATE then UPDATE, INSERT ... ON CONFLICT DO UPDATE — each keeping an
// exact model of the rows it owns: the seeded ids ≡ its number (mod clients)
// and every row it inserted. Seeded rows it never touched are known from
// seedRow, so the model stays small however large the table.
type Load struct {
	pool      *pgxpool.Pool
	seedRows  int64
	customers int
	clients   []*client
	side      atomic.Pointer[side]
	phase     atomic.Pointer[PhaseStats]
	phasesMu  sync.Mutex
	phases    []*PhaseStats
	stopping  atomic.Bool
	wg        sync.WaitGroup
	total     atomic.Int64
	totalErrs atomic.Int64
	errMu     sync.Mutex
	errs      []string
}

type client struct {
	no       int
	rng      *rand.Rand
	touched  map[int64]*orderRow // nil value: deleted
	inserted []int64
}

// StartLoad connects n clients to dsn and starts them. The pool uses
// QueryExecModeExec: no server-side prepared-statement cache, because a
// cached plan whose result type changes (amount float8 → numeric) fails once
// per connection after a swap — a documented PostgreSQL limit, not the tool's.
func StartLoad(ctx context.Context, dsn string, n int, seedRows int64, customers int) (*Load, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	cfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
	cfg.ConnConfig.RuntimeParams["application_name"] = "shadowctl-demo-load"
	cfg.MaxConns = int32(n)
	cfg.MinConns = int32(n)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("load: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("load: %w", err)
	}
	l := &Load{pool: pool, seedRows: seedRows, customers: customers}
	l.side.Store(&side{})
	l.SetPhase("load warm-up")
	for i := range n {
		l.clients = append(l.clients, &client{no: i, rng: rand.New(rand.NewPCG(uint64(i), 20261128)), touched: map[int64]*orderRow{}})
	}
	// Started only once l.clients is complete: the clients read its length.
	for _, c := range l.clients {
		l.wg.Add(1)
		go l.run(ctx, c)
	}
	return l, nil
}

// SetPhase starts a new measurement phase and returns it.
func (l *Load) SetPhase(name string) *PhaseStats {
	now := time.Now()
	p := &PhaseStats{Name: name, Start: now}
	l.phasesMu.Lock()
	if n := len(l.phases); n > 0 {
		l.phases[n-1].End = now
	}
	l.phases = append(l.phases, p)
	l.phasesMu.Unlock()
	l.phase.Store(p)
	return p
}

// Phases returns the measured phases in order.
func (l *Load) Phases() []*PhaseStats {
	l.phasesMu.Lock()
	defer l.phasesMu.Unlock()
	return append([]*PhaseStats(nil), l.phases...)
}

// Current is the phase being measured.
func (l *Load) Current() *PhaseStats { return l.phase.Load() }

// BeginSwap marks a swap in flight: operations overlapping it cannot tell
// which side took them.
func (l *Load) BeginSwap() {
	cur := l.side.Load()
	l.side.Store(&side{green: cur.green, swapping: true})
}

// EndSwap records which side serves after the swap.
func (l *Load) EndSwap(green bool) { l.side.Store(&side{green: green}) }

// Ops is the number of successful operations so far.
func (l *Load) Ops() int64 { return l.total.Load() }

// Errors is the number of failed operations so far.
func (l *Load) Errors() int64 { return l.totalErrs.Load() }

// ErrorSamples returns the first errors seen.
func (l *Load) ErrorSamples() []string {
	l.errMu.Lock()
	defer l.errMu.Unlock()
	return append([]string(nil), l.errs...)
}

// WaitOps blocks until n more operations have succeeded (polling the counter:
// the condition itself, not a guess of how long it takes) or ctx ends.
func (l *Load) WaitOps(ctx context.Context, n int64) error {
	target := l.total.Load() + n
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for l.total.Load() < target {
		if l.stopping.Load() {
			return errors.New("load: stopped")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// Stop ends the clients between statements (never inside one, so the model
// stays exact) and closes the pool.
func (l *Load) Stop() {
	l.stopping.Store(true)
	l.wg.Wait()
	l.phasesMu.Lock()
	if n := len(l.phases); n > 0 && l.phases[n-1].End.IsZero() {
		l.phases[n-1].End = time.Now()
	}
	l.phasesMu.Unlock()
	l.pool.Close()
}

func (l *Load) run(ctx context.Context, c *client) {
	defer l.wg.Done()
	for !l.stopping.Load() && ctx.Err() == nil {
		ph, before := l.phase.Load(), l.side.Load()
		start := time.Now()
		op, err := l.step(ctx, c, before)
		lat := time.Since(start)
		if ctx.Err() != nil {
			return // interrupted: the outcome of the last statement is unknown, and it does not matter
		}
		if op == "" {
			continue
		}
		ph.record(op, lat, err != nil)
		if err != nil {
			l.totalErrs.Add(1)
			l.errMu.Lock()
			if len(l.errs) < 20 {
				l.errs = append(l.errs, fmt.Sprintf("client %d, %s: %v", c.no, op, err))
			}
			l.errMu.Unlock()
			continue
		}
		l.total.Add(1)
	}
}

// row returns the model's row id (nil when it does not exist).
func (l *Load) row(c *client, id int64) *orderRow {
	if r, ok := c.touched[id]; ok {
		return r
	}
	if id >= 1 && id <= l.seedRows {
		r := seedRow(id, l.customers)
		return &r
	}
	return nil
}

// pick returns a live id this client owns.
func (l *Load) pick(c *client) (int64, *orderRow, bool) {
	for range 20 {
		var id int64
		if len(c.inserted) > 0 && (l.seedRows == 0 || c.rng.IntN(4) == 0) {
			i := c.rng.IntN(len(c.inserted))
			id = c.inserted[i]
			if r := l.row(c, id); r != nil {
				return id, r, true
			}
			c.inserted[i] = c.inserted[len(c.inserted)-1]
			c.inserted = c.inserted[:len(c.inserted)-1]
			continue
		}
		if l.seedRows == 0 {
			return 0, nil, false
		}
		n := int64(len(l.clients))
		id = c.rng.Int64N(l.seedRows)/n*n + int64(c.no)
		if id < 1 || id > l.seedRows {
			continue
		}
		if r := l.row(c, id); r != nil {
			return id, r, true
		}
	}
	return 0, nil, false
}

// after works out a write's effect on customer_email from which side took it.
func (l *Load) after(before *side, prev emailState, insert bool) emailState {
	known := l.side.Load() == before && !before.swapping
	switch {
	case known && !before.green: // blue took it: the forward sync maps the whole row
		return emailMapped
	case known && insert: // the view over green: the column is omitted
		return emailNull
	case known: // an UPDATE through the view leaves the column as it was
		return prev
	case !insert && prev == emailMapped: // mapped either way
		return emailMapped
	default:
		return emailEither
	}
}

// step runs one operation and updates the model when it succeeded. It
// returns the operation's name ("" when there was nothing to do).
func (l *Load) step(ctx context.Context, c *client, before *side) (string, error) {
	o := ordersTable.Quoted()
	switch op := c.rng.IntN(100); {
	case op < 30: // INSERT ... RETURNING, id and created_at from their defaults
		r := orderRow{CustomerID: 1 + c.rng.IntN(l.customers), AmountCents: c.rng.Int64N(100000), Status: "new"}
		var id int64
		err := l.pool.QueryRow(ctx, `INSERT INTO `+o+` (customer_id, customer_name, amount) VALUES ($1, $2, $3::numeric / 100) RETURNING id`,
			r.CustomerID, customerName(r.CustomerID), r.AmountCents).Scan(&id)
		if err != nil {
			return "insert", err
		}
		if l.row(c, id) != nil {
			return "insert", fmt.Errorf("INSERT returned id %d, which already exists in the model", id)
		}
		r.Email = l.after(before, emailNull, true)
		c.touched[id] = &r
		c.inserted = append(c.inserted, id)
		return "insert", nil
	case op < 55: // UPDATE by id
		id, cur, ok := l.pick(c)
		if !ok {
			return "", nil
		}
		r := *cur
		r.AmountCents, r.Status = c.rng.Int64N(100000), statuses[c.rng.IntN(len(statuses))]
		ct, err := l.pool.Exec(ctx, `UPDATE `+o+` SET amount = $2::numeric / 100, status = $3 WHERE id = $1`, id, r.AmountCents, r.Status)
		if err != nil {
			return "update", err
		}
		if ct.RowsAffected() != 1 {
			return "update", fmt.Errorf("UPDATE of id %d hit %d rows", id, ct.RowsAffected())
		}
		r.Email = l.after(before, cur.Email, false)
		c.touched[id] = &r
		return "update", nil
	case op < 65: // DELETE
		id, _, ok := l.pick(c)
		if !ok {
			return "", nil
		}
		ct, err := l.pool.Exec(ctx, `DELETE FROM `+o+` WHERE id = $1`, id)
		if err != nil {
			return "delete", err
		}
		if ct.RowsAffected() != 1 {
			return "delete", fmt.Errorf("DELETE of id %d hit %d rows", id, ct.RowsAffected())
		}
		c.touched[id] = nil
		return "delete", nil
	case op < 85: // SELECT ... FOR UPDATE, check, UPDATE in the same transaction
		id, cur, ok := l.pick(c)
		if !ok {
			return "", nil
		}
		r := *cur
		err := pgx.BeginFunc(ctx, l.pool, func(tx pgx.Tx) error {
			var cents int64
			var status string
			if err := tx.QueryRow(ctx, `SELECT round(amount::numeric * 100)::bigint, status FROM `+o+` WHERE id = $1 FOR UPDATE`, id).Scan(&cents, &status); err != nil {
				return err
			}
			if cents != r.AmountCents || status != r.Status {
				return fmt.Errorf("id %d reads (%d cents, %s), the model has (%d cents, %s)", id, cents, status, r.AmountCents, r.Status)
			}
			r.AmountCents = (cents + 1) % 100000
			_, err := tx.Exec(ctx, `UPDATE `+o+` SET amount = $2::numeric / 100 WHERE id = $1`, id, r.AmountCents)
			return err
		})
		if err != nil {
			return "select for update", err
		}
		r.Email = l.after(before, cur.Email, false)
		c.touched[id] = &r
		return "select for update", nil
	default: // INSERT ... ON CONFLICT DO UPDATE on an existing id
		id, cur, ok := l.pick(c)
		if !ok {
			return "", nil
		}
		r := *cur
		r.AmountCents, r.Status = c.rng.Int64N(100000), "upserted"
		_, err := l.pool.Exec(ctx, `INSERT INTO `+o+` (id, customer_id, customer_name, amount, status) VALUES ($1, $2, $3, $4::numeric / 100, 'upserted')
			ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount, status = EXCLUDED.status`, id, r.CustomerID, customerName(r.CustomerID), r.AmountCents)
		if err != nil {
			return "insert on conflict", err
		}
		r.Email = l.after(before, cur.Email, false)
		c.touched[id] = &r
		return "insert on conflict", nil
	}
}

// CheckResult is the outcome of comparing the table with the model.
type CheckResult struct {
	Rows        int64 // rows in the table
	Expected    int64 // rows in the model
	Touched     int   // rows the load wrote (inserted, updated or deleted)
	EmailNull   int64 // rows with customer_email NULL
	EmailEither int64 // rows whose email the model could not pin down (written during a swap)
	Diffs       []string
	DiffCount   int
}

// OK reports an exact match.
func (r CheckResult) OK() bool { return r.DiffCount == 0 && r.Rows == r.Expected }

// Check reads public.orders in id order and compares every row with the
// model: id, customer_id, customer_name, amount in cents, status and
// customer_email (when withEmail). Call it after Stop.
func (l *Load) Check(ctx context.Context, dsn string, withEmail bool) (CheckResult, error) {
	var res CheckResult
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return res, fmt.Errorf("check: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	want := map[int64]*orderRow{}
	for _, c := range l.clients {
		for id, r := range c.touched {
			want[id] = r
		}
		res.Touched += len(c.touched)
	}
	emailCol := "NULL::text"
	if withEmail {
		emailCol = "customer_email"
	}
	rows, err := conn.Query(ctx, `SELECT id, customer_id, customer_name, round(amount::numeric * 100)::bigint, status, `+emailCol+` FROM `+ordersTable.Quoted()+` ORDER BY id`)
	if err != nil {
		return res, fmt.Errorf("check: %w", err)
	}
	defer rows.Close()
	diff := func(format string, args ...any) {
		res.DiffCount++
		if len(res.Diffs) < 10 {
			res.Diffs = append(res.Diffs, fmt.Sprintf(format, args...))
		}
	}
	seen := map[int64]bool{}
	var (
		id, cents   int64
		cid         int
		name, st    string
		email       *string
		seedCounted int64
	)
	for rows.Next() {
		if err := rows.Scan(&id, &cid, &name, &cents, &st, &email); err != nil {
			return res, fmt.Errorf("check: %w", err)
		}
		res.Rows++
		var w *orderRow
		if r, ok := want[id]; ok {
			seen[id] = true
			w = r
		} else if id >= 1 && id <= l.seedRows {
			s := seedRow(id, l.customers)
			w = &s
			seedCounted++
		}
		if w == nil {
			diff("id %d is in the table, not in the model", id)
			continue
		}
		got := orderRow{CustomerID: cid, AmountCents: cents, Status: st, Email: w.Email}
		if withEmail {
			if email == nil {
				res.EmailNull++
			}
			switch {
			case email == nil && w.Email == emailMapped:
				diff("id %d: customer_email is NULL, want %s", id, customerEmail(cid))
			case email != nil && w.Email == emailNull:
				diff("id %d: customer_email is %q, want NULL", id, *email)
			case email != nil && *email != customerEmail(cid):
				diff("id %d: customer_email is %q, want %q", id, *email, customerEmail(cid))
			}
			if w.Email == emailEither {
				res.EmailEither++
			}
		}
		if name != customerName(cid) {
			diff("id %d: customer_name is %q, want %q", id, name, customerName(cid))
		}
		wr := *w
		if got != wr {
			diff("id %d is %+v, want %+v", id, got, wr)
		}
	}
	if err := rows.Err(); err != nil {
		return res, fmt.Errorf("check: %w", err)
	}
	// Rows of the model the table lacks.
	var missing []int64
	deletedSeed := int64(0)
	for id, r := range want {
		if r == nil {
			if id >= 1 && id <= l.seedRows {
				deletedSeed++
			}
			continue
		}
		if !seen[id] {
			missing = append(missing, id)
		}
	}
	sort.Slice(missing, func(i, j int) bool { return missing[i] < missing[j] })
	for _, id := range missing {
		diff("id %d is missing (want %+v)", id, *want[id])
	}
	touchedSeed := int64(0)
	live := int64(0)
	for id, r := range want {
		if id >= 1 && id <= l.seedRows {
			touchedSeed++
		}
		if r != nil {
			live++
		}
	}
	res.Expected = l.seedRows - touchedSeed + live
	if untouched := l.seedRows - touchedSeed; seedCounted != untouched {
		diff("%d untouched seed rows in the table, want %d (%d seed rows deleted by the load)", seedCounted, untouched, deletedSeed)
	}
	return res, nil
}

// Summary renders a check for people.
func (r CheckResult) Summary() string {
	if r.OK() {
		return fmt.Sprintf("exact: %d rows, every one equal to the load's model (%d rows written by the load)", r.Rows, r.Touched)
	}
	return fmt.Sprintf("DIFFERENT: %d rows in the table, %d in the model, %d differences:\n    %s", r.Rows, r.Expected, r.DiffCount, strings.Join(r.Diffs, "\n    "))
}

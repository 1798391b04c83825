package integration

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// orderRow is what the workload knows of one orders row.
type orderRow struct {
	CustomerID  int
	AmountCents int64
	Status      string
}

// workload is a set of clients that write through public.orders the way an
// application does (INSERT ... RETURNING, UPDATE by key including key
// changes, DELETE, SELECT ... FOR UPDATE, INSERT ... ON CONFLICT) and keep
// their own model of every row they own, so the exact end state is known.
// Each client owns the pre-existing rows with id % clients == its number and
// every row it inserts.
type workload struct {
	t        testing.TB
	pool     *pgxpool.Pool
	clients  int
	models   []map[int]orderRow
	errs     chan error
	ops      atomic.Int64
	errCount atomic.Int64
	stopping atomic.Bool
	wg       sync.WaitGroup
	// progress is closed after the first N operations, so tests can wait for
	// the workload to be running rather than sleep.
	started  chan struct{}
	startOne sync.Once
}

// startWorkload snapshots public.orders and starts the clients.
func startWorkload(t testing.TB, dsn string, clients int) *workload {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	// No server-side prepared statement cache: a cached plan whose result
	// type changes fails once after the swap (a documented PostgreSQL limit,
	// tested separately).
	cfg.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeExec
	cfg.MaxConns = int32(clients + 1)
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	w := &workload{t: t, pool: pool, clients: clients, errs: make(chan error, 1000), started: make(chan struct{})}
	w.models = make([]map[int]orderRow, clients)
	for i := range w.models {
		w.models[i] = map[int]orderRow{}
	}
	all := w.read()
	for id, r := range all {
		w.models[id%clients][id] = r
	}
	for c := 0; c < clients; c++ {
		w.wg.Add(1)
		go w.client(context.Background(), c)
	}
	return w
}

// read loads public.orders as the workload sees it.
func (w *workload) read() map[int]orderRow {
	rows, err := w.pool.Query(context.Background(), `SELECT id, customer_id, round(amount::numeric * 100)::bigint, status FROM public.orders`)
	if err != nil {
		w.t.Fatalf("read orders: %v", err)
	}
	out := map[int]orderRow{}
	for rows.Next() {
		var id int
		var r orderRow
		if err := rows.Scan(&id, &r.CustomerID, &r.AmountCents, &r.Status); err != nil {
			w.t.Fatal(err)
		}
		out[id] = r
	}
	if rows.Err() != nil {
		w.t.Fatal(rows.Err())
	}
	return out
}

// waitRunning blocks until the clients have done some work.
func (w *workload) waitRunning() { <-w.started }

// waitOps blocks until at least n more operations completed (polling the
// counter: the condition itself, not a guess of how long it takes).
func (w *workload) waitOps(n int64) {
	target := w.ops.Load() + n
	for w.ops.Load() < target && !w.stopping.Load() {
		time.Sleep(time.Millisecond)
	}
}

func (w *workload) client(ctx context.Context, no int) {
	defer w.wg.Done()
	rng := rand.New(rand.NewPCG(uint64(no), 42))
	model := w.models[no]
	ids := make([]int, 0, len(model))
	for id := range model {
		ids = append(ids, id)
	}
	sort.Ints(ids)
	pick := func() (int, bool) {
		for len(ids) > 0 {
			i := rng.IntN(len(ids))
			if _, ok := model[ids[i]]; ok {
				return ids[i], true
			}
			ids[i] = ids[len(ids)-1]
			ids = ids[:len(ids)-1]
		}
		return 0, false
	}
	for !w.stopping.Load() {
		var err error
		switch op := rng.IntN(100); {
		case op < 30: // INSERT ... RETURNING with defaults
			r := orderRow{CustomerID: 1 + rng.IntN(1000), AmountCents: rng.Int64N(100000), Status: "new"}
			var id int
			err = w.pool.QueryRow(ctx, `INSERT INTO public.orders (customer_id, customer_name, amount) VALUES ($1, $2, $3::numeric / 100) RETURNING id`,
				r.CustomerID, fmt.Sprintf("customer %d", r.CustomerID), r.AmountCents).Scan(&id)
			if err == nil {
				model[id] = r
				ids = append(ids, id)
			}
		case op < 55: // UPDATE by key
			id, ok := pick()
			if !ok {
				continue
			}
			r := model[id]
			r.AmountCents, r.Status = rng.Int64N(100000), []string{"paid", "shipped", "new"}[rng.IntN(3)]
			var tag int64
			ct, e := w.pool.Exec(ctx, `UPDATE public.orders SET amount = $2::numeric / 100, status = $3 WHERE id = $1`, id, r.AmountCents, r.Status)
			err, tag = e, ct.RowsAffected()
			if err == nil {
				if tag != 1 {
					err = fmt.Errorf("update of id %d hit %d rows", id, tag)
				}
				model[id] = r
			}
		case op < 62: // key change
			id, ok := pick()
			if !ok {
				continue
			}
			var nid int
			err = w.pool.QueryRow(ctx, `UPDATE public.orders SET id = nextval('public.orders_id_seq') WHERE id = $1 RETURNING id`, id).Scan(&nid)
			if err == nil {
				model[nid] = model[id]
				delete(model, id)
				ids = append(ids, nid)
			}
		case op < 72: // DELETE
			id, ok := pick()
			if !ok {
				continue
			}
			ct, e := w.pool.Exec(ctx, `DELETE FROM public.orders WHERE id = $1`, id)
			err = e
			if err == nil {
				if ct.RowsAffected() != 1 {
					err = fmt.Errorf("delete of id %d hit %d rows", id, ct.RowsAffected())
				}
				delete(model, id)
			}
		case op < 85: // SELECT ... FOR UPDATE, then UPDATE in the same transaction
			id, ok := pick()
			if !ok {
				continue
			}
			r := model[id]
			err = pgx.BeginFunc(ctx, w.pool, func(tx pgx.Tx) error {
				var cents int64
				if err := tx.QueryRow(ctx, `SELECT round(amount::numeric * 100)::bigint FROM public.orders WHERE id = $1 FOR UPDATE`, id).Scan(&cents); err != nil {
					return err
				}
				if cents != r.AmountCents {
					return fmt.Errorf("id %d: read amount %d cents, model has %d", id, cents, r.AmountCents)
				}
				r.AmountCents = cents + 1
				_, err := tx.Exec(ctx, `UPDATE public.orders SET amount = $2::numeric / 100 WHERE id = $1`, id, r.AmountCents)
				return err
			})
			if err == nil {
				model[id] = r
			}
		default: // INSERT ... ON CONFLICT DO UPDATE on an existing key
			id, ok := pick()
			if !ok {
				continue
			}
			r := model[id]
			r.Status = "upserted"
			_, err = w.pool.Exec(ctx, `INSERT INTO public.orders (id, customer_id, customer_name, amount, status) VALUES ($1, $2, 'x', $3::numeric / 100, 'upserted')
				ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status`, id, r.CustomerID, r.AmountCents)
			if err == nil {
				model[id] = r
			}
		}
		if err != nil {
			w.errCount.Add(1)
			select {
			case w.errs <- fmt.Errorf("client %d: %w", no, err):
			default:
			}
			continue
		}
		if w.ops.Add(1) == int64(w.clients*20) {
			w.startOne.Do(func() { close(w.started) })
		}
	}
}

// stop ends the clients between statements (never mid-statement, so the
// model stays exact) and returns their errors.
func (w *workload) stop() []error {
	w.stopping.Store(true)
	w.wg.Wait()
	w.startOne.Do(func() { close(w.started) })
	close(w.errs)
	var out []error
	for e := range w.errs {
		out = append(out, e)
	}
	return out
}

// expected is the union of the clients' models.
func (w *workload) expected() map[int]orderRow {
	out := map[int]orderRow{}
	for _, m := range w.models {
		for id, r := range m {
			out[id] = r
		}
	}
	return out
}

// assertExact stops nothing; it compares public.orders with the model.
func (w *workload) assertExact(t testing.TB) {
	t.Helper()
	got, want := w.read(), w.expected()
	var diffs []string
	for id, r := range want {
		if g, ok := got[id]; !ok {
			diffs = append(diffs, fmt.Sprintf("id %d missing (want %+v)", id, r))
		} else if g != r {
			diffs = append(diffs, fmt.Sprintf("id %d is %+v, want %+v", id, g, r))
		}
	}
	for id, g := range got {
		if _, ok := want[id]; !ok {
			diffs = append(diffs, fmt.Sprintf("id %d unexpected: %+v", id, g))
		}
	}
	if len(diffs) > 0 {
		sort.Strings(diffs)
		if len(diffs) > 10 {
			diffs = append(diffs[:10], fmt.Sprintf("... and %d more", len(diffs)-10))
		}
		t.Fatalf("public.orders differs from what the workload wrote (%d rows expected):\n%s", len(want), strings.Join(diffs, "\n"))
	}
}

// stopAndCheck stops the workload, fails on any client error and checks the
// exact end state.
func (w *workload) stopAndCheck(t testing.TB) {
	t.Helper()
	errs := w.stop()
	defer w.pool.Close()
	if len(errs) > 0 {
		t.Fatalf("%d workload errors (first %d shown): %v", w.errCount.Load(), len(errs), errors.Join(errs[:min(len(errs), 5)]...))
	}
	if w.ops.Load() == 0 {
		t.Fatal("the workload did nothing")
	}
	w.assertExact(t)
	t.Logf("workload: %d operations, 0 errors, %d rows exact", w.ops.Load(), len(w.expected()))
}

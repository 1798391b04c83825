package integration

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/internal/catalog"
)

const backfillRows = 200_000

// TestEverydayBackfillUnderLoadResumes runs a batched UPDATE backfill of
// 200,000 rows while three workload goroutines insert rows, overwrite the
// backfilled column and update another column; the first run is cancelled
// once a third of the rows are done, the CLI reruns it and must resume.
func TestEverydayBackfillUnderLoadResumes(t *testing.T) {
	ctx := context.Background()
	began := time.Now()
	pool, dsn := pgtest.NewPool(t)
	shadowctlBinary(t) // build it now, not while the workload runs
	mustExec(t, pool, `
		CREATE TABLE customers (id int PRIMARY KEY, email text NOT NULL);
		INSERT INTO customers SELECT g, 'c' || g || '@example.com' FROM generate_series(1, 1000) g;
		CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,
			qty int NOT NULL DEFAULT 0, customer_email text);
		INSERT INTO orders (customer_id) SELECT 1 + g % 1000 FROM generate_series(1, `+strconv.Itoa(backfillRows)+`) g;
		ANALYZE orders;`)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	cat := catalog.New("")
	if _, _, err := cat.Init(ctx, conn); err != nil {
		t.Fatal(err)
	}

	t.Logf("%s: setup done", time.Since(began).Round(time.Millisecond))
	// The workload: an application already writing the new column.
	wctx, stopWorkload := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var werrs atomic.Int64
	var firstErr atomic.Value
	var inserts, overwrites, touches atomic.Int64
	var overwritten sync.Map // id -> struct{}
	// Statements run on ctx, not wctx: a cancelled statement might have
	// committed without the goroutine knowing it.
	fail := func(err error) {
		werrs.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	wg.Add(3)
	go func() { // inserts rows with the column set
		defer wg.Done()
		for wctx.Err() == nil {
			c := 1 + rand.IntN(1000)
			if _, err := pool.Exec(ctx, `INSERT INTO orders (customer_id, customer_email) VALUES ($1, 'inserted')`, c); err != nil {
				fail(err)
				continue
			}
			inserts.Add(1)
		}
	}()
	go func() { // overwrites the column of existing rows: the backfill must not undo this
		defer wg.Done()
		for wctx.Err() == nil {
			id := 1 + rand.Int64N(backfillRows)
			if _, err := pool.Exec(ctx, `UPDATE orders SET customer_email = 'wl-' || id WHERE id = $1`, id); err != nil {
				fail(err)
				continue
			}
			overwritten.Store(id, struct{}{})
			overwrites.Add(1)
		}
	}()
	go func() { // touches another column of existing rows (row locks, new versions)
		defer wg.Done()
		for wctx.Err() == nil {
			id := 1 + rand.Int64N(backfillRows)
			if _, err := pool.Exec(ctx, `UPDATE orders SET qty = qty + 1 WHERE id = $1`, id); err != nil {
				fail(err)
				continue
			}
			touches.Add(1)
		}
	}()
	defer func() { stopWorkload(); wg.Wait() }()

	u := backfill.Update{Table: "orders", Set: "customer_email = customers.email", From: "customers",
		Where: "orders.customer_id = customers.id", OnlyNull: "customer_email"}

	// First run, in process, cancelled once a third of the rows are done.
	runCtx, cancelRun := context.WithCancel(ctx)
	type runOut struct {
		res backfill.UpdateResult
		err error
	}
	out := make(chan runOut, 1)
	go func() {
		res, err := backfill.RunUpdate(runCtx, conn, cat, u, backfill.UpdateOptions{
			MaxBatch: 2000, MaxRowsPerSecond: 60_000, LockTimeout: time.Second,
			Log: zerolog.New(zerolog.NewTestWriter(t)),
		})
		out <- runOut{res, err}
	}()
	watch, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close(ctx)
	var changed int64
	pollUntil(t, 90*time.Second, "first run changed 60,000 rows", func() bool {
		err := watch.QueryRow(ctx, `SELECT coalesce(max(rows_changed), 0) FROM shadowctl.backfills`).Scan(&changed)
		if err != nil {
			t.Fatal(err)
		}
		return changed >= 60_000
	})
	cancelRun()
	first := <-out
	if !errors.Is(first.err, context.Canceled) {
		t.Fatalf("first run: err %v, want context.Canceled (result %+v)", first.err, first.res)
	}
	var ckRows int64
	var lastKey []string
	var done bool
	if err := watch.QueryRow(ctx, `SELECT rows_changed, last_key, done FROM shadowctl.backfills WHERE id = $1`, first.res.ID).
		Scan(&ckRows, &lastKey, &done); err != nil {
		t.Fatal(err)
	}
	if done || ckRows <= 0 || len(lastKey) != 1 || ckRows != first.res.RowsChanged {
		t.Fatalf("checkpoint after the cancelled run: rows %d (run said %d), last key %v, done %v",
			ckRows, first.res.RowsChanged, lastKey, done)
	}
	t.Logf("%s: first run stopped at key %v with %d rows changed", time.Since(began).Round(time.Millisecond), lastKey, ckRows)

	// Rerun through the CLI, same arguments in another spelling: it resumes.
	r := runCLI(t, fastExit(), "--dsn", dsn, "backfill", "--table", "public.orders",
		"--set", "customer_email  =  customers.email", "--from", "customers",
		"--where", "orders.customer_id = customers.id", "--only-null", "customer_email",
		"--batch-size", "5000", "--lock-timeout", "1s", "--progress-every", "2s")
	if r.Code != 0 {
		t.Fatalf("rerun exited %d:\n%s\n%s", r.Code, r.Stdout, r.Stderr)
	}
	m := regexp.MustCompile(`done: (\d+) rows changed \((\d+) this run, resumed`).FindStringSubmatch(r.Stdout)
	if m == nil {
		t.Fatalf("rerun output %q does not say it resumed", r.Stdout)
	}
	total, _ := strconv.ParseInt(m[1], 10, 64)
	thisRun, _ := strconv.ParseInt(m[2], 10, 64)
	if thisRun <= 0 || thisRun >= backfillRows || total != ckRows+thisRun {
		t.Fatalf("rerun: total %d, this run %d, checkpoint before %d", total, thisRun, ckRows)
	}
	t.Logf("%s: rerun done", time.Since(began).Round(time.Millisecond))
	again := runCLI(t, fastExit(), "--dsn", dsn, "backfill", "--table", "orders", "--set", "customer_email = customers.email",
		"--from", "customers", "--where", "orders.customer_id = customers.id", "--only-null", "customer_email")
	if again.Code != 0 || !regexp.MustCompile(`already done`).MatchString(again.Stdout) {
		t.Fatalf("third run: %d %q %q", again.Code, again.Stdout, again.Stderr)
	}

	stopWorkload()
	wg.Wait()
	if n := werrs.Load(); n != 0 {
		t.Fatalf("%d workload errors, first: %v", n, firstErr.Load())
	}
	t.Logf("workload: %d inserts, %d overwrites, %d touches", inserts.Load(), overwrites.Load(), touches.Load())
	if inserts.Load() == 0 || overwrites.Load() == 0 || touches.Load() == 0 {
		t.Fatal("a workload goroutine did nothing")
	}

	var nulls int64
	if err := watch.QueryRow(ctx, `SELECT count(*) FROM orders WHERE customer_email IS NULL`).Scan(&nulls); err != nil {
		t.Fatal(err)
	}
	if nulls != 0 {
		t.Fatalf("%d rows still NULL", nulls)
	}
	// Overwritten rows keep the workload's value; the others have the backfill's.
	var ids []int64
	overwritten.Range(func(k, _ any) bool { ids = append(ids, k.(int64)); return true })
	var lost int64
	if err := watch.QueryRow(ctx, `SELECT count(*) FROM orders WHERE id = ANY($1) AND customer_email <> 'wl-' || id`, ids).Scan(&lost); err != nil {
		t.Fatal(err)
	}
	if lost != 0 {
		t.Fatalf("%d of %d workload writes were overwritten by the backfill", lost, len(ids))
	}
	var wrong, fromBackfill, insertedWrong int64
	if err := watch.QueryRow(ctx, `SELECT
			count(*) FILTER (WHERE o.id <= $1 AND NOT (o.id = ANY($2)) AND o.customer_email IS DISTINCT FROM c.email),
			count(*) FILTER (WHERE o.customer_email = c.email),
			count(*) FILTER (WHERE o.id > $1 AND o.customer_email <> 'inserted')
		FROM orders o JOIN customers c ON c.id = o.customer_id`, backfillRows, ids).Scan(&wrong, &fromBackfill, &insertedWrong); err != nil {
		t.Fatal(err)
	}
	if wrong != 0 || insertedWrong != 0 {
		t.Fatalf("%d original rows without the customer's email, %d inserted rows changed", wrong, insertedWrong)
	}
	if total < fromBackfill || total > backfillRows {
		t.Fatalf("rows changed %d, but %d rows hold the backfilled value (of %d)", total, fromBackfill, backfillRows)
	}
	t.Logf("backfill: %d rows changed (%d on rerun); %d rows overwritten by the workload kept", total, thisRun, len(ids))
}

// pollUntil polls cond every 20ms until it holds or the deadline passes.
func pollUntil(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting until %s", within, what)
		}
		<-tick.C
	}
}

// itemsToBackfill makes a database holding items(id, price, label) with n
// rows whose label is NULL, and shadowctl's catalog. It returns a pool, a
// session for the backfill, the catalog, and the DSN for more sessions.
func itemsToBackfill(t *testing.T, n int) (*pgxpool.Pool, *pgx.Conn, catalog.Catalog, string) {
	t.Helper()
	pool, dsn := pgtest.NewPool(t)
	mustExec(t, pool, fmt.Sprintf(`CREATE TABLE items (id int PRIMARY KEY, price int NOT NULL, label text);
		INSERT INTO items SELECT g, g, NULL FROM generate_series(1, %d) g;`, n))
	conn := connectTo(t, dsn)
	cat := catalog.New("")
	if _, _, err := cat.Init(context.Background(), conn); err != nil {
		t.Fatal(err)
	}
	return pool, conn, cat, dsn
}

// connectTo opens a session closed when the test ends.
func connectTo(t testing.TB, dsn string) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func mustExec(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// TestEverydayBackfillOnlyNullRecheckedUnderRowLock: a row the application
// is writing when the batch reaches it keeps the application's value: the
// batch waits for the row lock, then re-checks IS NULL on the new version.
func TestEverydayBackfillOnlyNullRecheckedUnderRowLock(t *testing.T) {
	ctx := context.Background()
	_, conn, cat, dsn := itemsToBackfill(t, 1000)
	app, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(ctx)
	if _, err := app.Exec(ctx, `BEGIN; UPDATE items SET label = 'app' WHERE id = 500`); err != nil {
		t.Fatal(err)
	}
	out := make(chan error, 1)
	var res backfill.UpdateResult
	go func() {
		var err error
		res, err = backfill.RunUpdate(ctx, conn, cat, backfill.Update{Table: "items", Set: "label = 'p' || price", OnlyNull: "label"},
			backfill.UpdateOptions{MaxBatch: 5000, LockTimeout: time.Minute, Log: zerolog.New(zerolog.NewTestWriter(t))})
		out <- err
	}()
	watch, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close(ctx)
	var appPID uint32
	if err := app.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&appPID); err != nil {
		t.Fatal(err)
	}
	pollUntil(t, 30*time.Second, "the batch waits for the application's row lock", func() bool {
		var waiting bool
		if err := watch.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_stat_activity
			WHERE datname = current_database() AND $1 = ANY (pg_blocking_pids(pid)))`, appPID).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		return waiting
	})
	if _, err := app.Exec(ctx, `COMMIT`); err != nil {
		t.Fatal(err)
	}
	if err := <-out; err != nil {
		t.Fatal(err)
	}
	var label string
	var others int64
	if err := watch.QueryRow(ctx, `SELECT (SELECT label FROM items WHERE id = 500),
		(SELECT count(*) FROM items WHERE id <> 500 AND label = 'p' || price)`).Scan(&label, &others); err != nil {
		t.Fatal(err)
	}
	if label != "app" || others != 999 || res.RowsChanged != 999 {
		t.Fatalf("row 500 = %q (want the application's 'app'); %d others backfilled, %d rows changed (want 999)", label, others, res.RowsChanged)
	}
}

// TestEverydayBackfillCompositeQuotedKey: a composite key and identifiers
// that need quoting, many small batches, the same result as one UPDATE.
func TestEverydayBackfillCompositeQuotedKey(t *testing.T) {
	pool, dsn := pgtest.NewPool(t)
	mustExec(t, pool, `CREATE SCHEMA "Shop";
		CREATE TABLE "Shop"."Order Items" ("Order Id" int, "Line" text, qty int NOT NULL, "Total" int,
			PRIMARY KEY ("Order Id", "Line"));
		INSERT INTO "Shop"."Order Items" SELECT o, 'l' || l, l, NULL FROM generate_series(1, 300) o, generate_series(1, 10) l;`)
	if r := runCLI(t, fastExit(), "--dsn", dsn, "init"); r.Code != 0 {
		t.Fatal(r.Stderr)
	}
	r := runCLI(t, fastExit(), "--dsn", dsn, "backfill", "--table", `"Shop"."Order Items"`, "--set", `"Total" = qty * 10`,
		"--where", `"Order Items"."Order Id" % 2 = 0`, "--only-null", `"Total"`, "--batch-size", "100")
	if r.Code != 0 || !strings.Contains(r.Stdout, "done: 1500 rows changed") {
		t.Fatalf("backfill: %d\n%s\n%s", r.Code, r.Stdout, r.Stderr)
	}
	var wrong int64
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM "Shop"."Order Items"
		WHERE "Total" IS DISTINCT FROM CASE WHEN "Order Id" % 2 = 0 THEN qty * 10 END`).Scan(&wrong); err != nil {
		t.Fatal(err)
	}
	if wrong != 0 {
		t.Fatalf("%d rows wrong", wrong)
	}
}

// A backfill never queues behind the application for longer than its
// lock_timeout: a batch meeting a row the application holds gives up after
// --lock-timeout, and is retried smaller; a writer to the rows the batch had
// already taken waits no longer than that. Out of retries, the backfill
// stops with ErrRetriesExhausted and records the error in the catalog. And
// while one run is in progress, a second run of the same backfill is
// refused (ErrRunning).
func TestEverydayBackfillLockTimeoutRetriesAndOneRunAtATime(t *testing.T) {
	ctx := context.Background()
	pool, first, cat, dsn := itemsToBackfill(t, 1000)
	connect := func() *pgx.Conn { return connectTo(t, dsn) }
	app := connect()
	if _, err := app.Exec(ctx, `BEGIN; SELECT 1 FROM items WHERE id = 500 FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	spec := backfill.Update{Table: "items", Set: "label = 'p' || price"}
	log := zerolog.New(zerolog.NewTestWriter(t))

	// One run at a time: the first waits on row 500 (a long lock_timeout).
	second := connect()
	out := make(chan error, 1)
	go func() {
		_, err := backfill.RunUpdate(ctx, first, cat, spec, backfill.UpdateOptions{MaxBatch: 5000, LockTimeout: time.Minute, Log: log})
		out <- err
	}()
	var appPID uint32
	if err := app.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&appPID); err != nil {
		t.Fatal(err)
	}
	blocked := func() bool {
		var waiting bool
		if err := pool.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_stat_activity
			WHERE datname = current_database() AND $1 = ANY (pg_blocking_pids(pid)))`, appPID).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		return waiting
	}
	pollUntil(t, 30*time.Second, "the first run's batch to wait for row 500", blocked)
	if _, err := backfill.RunUpdate(ctx, second, cat, spec, backfill.UpdateOptions{Log: log}); !errors.Is(err, backfill.ErrRunning) {
		t.Fatalf("a second run of the same backfill: %v, want ErrRunning", err)
	}
	if _, err := pool.Exec(ctx, `SELECT pg_cancel_backend(pid) FROM pg_stat_activity
		WHERE datname = current_database() AND $1 = ANY (pg_blocking_pids(pid))`, appPID); err != nil {
		t.Fatal(err)
	}
	if err := <-out; err == nil {
		t.Fatal("the first run finished with its batch canceled")
	}

	// Short lock_timeout, two retries: a writer behind the batch waits at
	// most about the timeout, and the backfill gives up.
	go func() {
		_, err := backfill.RunUpdate(ctx, second, cat, spec, backfill.UpdateOptions{MaxBatch: 5000, LockTimeout: 200 * time.Millisecond, Retries: 2, Log: log})
		out <- err
	}()
	pollUntil(t, 30*time.Second, "a batch to wait for row 500", blocked)
	probe := connect()
	start := time.Now()
	if _, err := probe.Exec(ctx, `UPDATE items SET price = price WHERE id = 499`); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited > 2*time.Second {
		t.Fatalf("a writer to row 499 waited %s behind the backfill's batch (lock_timeout 200ms)", waited.Round(time.Millisecond))
	}
	err := <-out
	if !errors.Is(err, backfill.ErrRetriesExhausted) {
		t.Fatalf("backfill against a held row: %v, want ErrRetriesExhausted", err)
	}
	var recorded string
	if err := pool.QueryRow(ctx, `SELECT coalesce(error, '') FROM shadowctl.backfills`).Scan(&recorded); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(recorded, "retries exhausted") {
		t.Fatalf("catalog error %q, want the retries exhausted", recorded)
	}
	if _, err := app.Exec(ctx, `ROLLBACK`); err != nil {
		t.Fatal(err)
	}
}

// Which rows a backfill covers: without --only-null, the keys up to the
// largest present when it first started (rows inserted above it while it
// runs are left alone: the application writes the new column for new rows);
// with --only-null, it goes on past that bound while rows with a NULL
// appear at higher keys.
func TestEverydayBackfillKeyBounds(t *testing.T) {
	for _, onlyNull := range []bool{false, true} {
		t.Run(map[bool]string{false: "up to the starting key", true: "only null, past it"}[onlyNull], func(t *testing.T) {
			ctx := context.Background()
			pool, conn, cat, _ := itemsToBackfill(t, 2000)
			spec := backfill.Update{Table: "items", Set: "label = 'p' || price"}
			if onlyNull {
				spec.OnlyNull = "label"
			}
			out := make(chan error, 1)
			go func() {
				// 100-row batches at 1,000 rows a second: two seconds.
				_, err := backfill.RunUpdate(ctx, conn, cat, spec, backfill.UpdateOptions{MaxBatch: 100, MaxRowsPerSecond: 1000,
					Log: zerolog.New(zerolog.NewTestWriter(t))})
				out <- err
			}()
			pollUntil(t, 30*time.Second, "the backfill's first checkpoint", func() bool {
				var n int64
				_ = pool.QueryRow(ctx, `SELECT coalesce(max(rows_changed), 0) FROM shadowctl.backfills`).Scan(&n)
				return n > 0
			})
			// New rows above the starting bound, the way an application
			// that does not fill the column yet would write them.
			mustExec(t, pool, `INSERT INTO items SELECT g, g, NULL FROM generate_series(2001, 2100) g`)
			if err := <-out; err != nil {
				t.Fatal(err)
			}
			var old, fresh int64
			if err := pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE id <= 2000 AND label = 'p' || price),
				count(*) FILTER (WHERE id > 2000 AND label IS NOT NULL) FROM items`).Scan(&old, &fresh); err != nil {
				t.Fatal(err)
			}
			want := map[bool]int64{false: 0, true: 100}[onlyNull]
			if old != 2000 || fresh != want {
				t.Fatalf("%d of the 2,000 starting rows filled (want all), %d of the 100 new ones (want %d)", old, fresh, want)
			}
		})
	}
}

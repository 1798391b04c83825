package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/internal/rowmap"
	"github.com/shadowctl/shadowctl/shadow"
)

// session is one application connection of a deterministic interleaving
// test: statements run in the background, so the test can look at what the
// session waits for while it is blocked.
type session struct {
	t    *testing.T
	conn *pgx.Conn
	pid  int32
	done chan error
}

func newSession(t *testing.T, db *testDB) *session {
	t.Helper()
	// A connection of its own: the runner's pool must not run dry.
	conn, err := pgx.Connect(context.Background(), db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	s := &session{t: t, conn: conn}
	if err := conn.QueryRow(context.Background(), `SELECT pg_backend_pid()`).Scan(&s.pid); err != nil {
		t.Fatal(err)
	}
	return s
}

// start runs sql in the background; wait returns its error.
func (s *session) start(sql string, args ...any) {
	s.done = make(chan error, 1)
	go func() {
		_, err := s.conn.Exec(context.Background(), sql, args...)
		s.done <- err
	}()
}

// run runs sql and waits for it.
func (s *session) run(sql string, args ...any) {
	s.t.Helper()
	if _, err := s.conn.Exec(context.Background(), sql, args...); err != nil {
		s.t.Fatalf("session %d: %s: %v", s.pid, sql, err)
	}
}

func (s *session) wait(what string) {
	s.t.Helper()
	select {
	case err := <-s.done:
		if err != nil {
			s.t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(30 * time.Second):
		s.t.Fatalf("%s did not finish", what)
	}
}

// finished reports whether the background statement has ended (without
// waiting), failing on its error.
func (s *session) finished() bool {
	s.t.Helper()
	select {
	case err := <-s.done:
		if err != nil {
			s.t.Fatalf("session %d: %v", s.pid, err)
		}
		s.done <- nil
		return true
	default:
		return false
	}
}

// createItems makes a table whose keys are the even numbers 2..2n, so rows can
// be inserted between the keys of a batch.
func createItems(db *testDB, table string, n int) {
	db.t.Helper()
	db.exec(
		fmt.Sprintf(`CREATE TABLE %s (id int PRIMARY KEY, v text NOT NULL, n int)`, qi(table)),
		fmt.Sprintf(`INSERT INTO %s SELECT 2 * g, 'v' || 2 * g, g FROM generate_series(1, %d) g`, qi(table), n),
	)
}

// pause holds the first caller of hold until release is closed; paused is
// closed when that caller arrives.
type pause struct {
	paused, release chan struct{}
	once            sync.Once
}

func newPause() *pause { return &pause{paused: make(chan struct{}), release: make(chan struct{})} }

func (p *pause) hold(ctx context.Context) {
	p.once.Do(func() {
		close(p.paused)
		select {
		case <-p.release:
		case <-ctx.Done():
		}
	})
}

func driveAsync(ctx context.Context, r *shadow.Runner, id string, until shadow.Phase) chan error {
	done := make(chan error, 1)
	go func() {
		_, err := r.Drive(ctx, id, until)
		done <- err
	}()
	return done
}

func waitDone(t *testing.T, what string, ch chan error) {
	t.Helper()
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("%s did not finish", what)
	}
}

func verifyResult(t *testing.T, db *testDB, id string) map[string]any {
	t.Helper()
	m, err := db.Runner.Store.Get(context.Background(), db.Pool, id)
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	if err := json.Unmarshal(m.Verify, &v); err != nil {
		t.Fatalf("verify result %q: %v", m.Verify, err)
	}
	return v
}

// Issue 3, done-when 2 (after the write): the first copy batch is paused
// inside its transaction after it read and wrote green, before its commit.
// Meanwhile a DELETE, a key change, a non-key UPDATE and an INSERT hit rows
// of that batch's key range:
//   - the DELETE and the key change wait for the batch (its key-bucket
//     locks, or its KEY SHARE row locks where the key is not an integer):
//     they never reach green while the batch is open;
//   - the non-key UPDATE is not blocked on blue, its trigger reaches green and
//     its upsert waits on green's key index for the batch's uncommitted row;
//   - the INSERT of a new key inside the range is not blocked at all.
//
// After the release, green equals the mapping of blue when the copy ends
// (before any verification could repair it): the deleted row is not
// resurrected, the updated row has its new version, the re-keyed row is only
// under its new key.
func TestIssue3InterleaveBatchPausedBeforeCommit(t *testing.T) {
	db := newTestDB(t)
	createItems(db, "items", 40)
	ctx := context.Background()

	var copyPID int32 // written before paused is closed, read after
	p := newPause()
	db.Runner.Failpoints.CopyBatchStart = func(ctx context.Context, tx pgx.Tx, r backfill.Range) error {
		if r.Last != nil {
			return nil
		}
		return tx.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&copyPID)
	}
	db.Runner.Failpoints.CopyBatch = func(ctx context.Context, r backfill.Range) error {
		if len(r.Last) == 1 && r.Last[0] == "20" { // the first batch: keys 2..20
			p.hold(ctx)
		}
		return nil
	}
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint", BatchSize: 10, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	drive := driveAsync(ctx, db.Runner, m.ID, shadow.Verifying)
	select {
	case <-p.paused:
	case err := <-drive:
		t.Fatalf("the copy ended before the failpoint: %v", err)
	}

	del, upd, rekey, ins := newSession(t, db), newSession(t, db), newSession(t, db), newSession(t, db)
	del.start(`DELETE FROM items WHERE id = 4`)
	upd.start(`UPDATE items SET v = 'updated', n = -6 WHERE id = 6`)
	rekey.start(`UPDATE items SET id = 1001 WHERE id = 8`)
	ins.start(`INSERT INTO items VALUES (5, 'inserted', 5)`)

	if b := waitLockWait(t, db, "the DELETE", del.pid); !contains32(b, copyPID) {
		t.Fatalf("the DELETE waits for %v, not for the copy batch %d", b, copyPID)
	}
	// An integer key: the DELETE waits for the batch's bucket lock, not a
	// row lock (the batch locks no row of blue).
	if kind := scalar[string](db, `SELECT string_agg(locktype, ',') FROM pg_locks WHERE pid = $1 AND NOT granted`, del.pid); kind != "advisory" {
		t.Fatalf("the DELETE waits for a %s lock, want the copy's advisory bucket lock", kind)
	}
	if n := scalar[int](db, `SELECT count(*) FROM public.items WHERE xmax <> 0 AND id BETWEEN 2 AND 20 AND id NOT IN (4, 6, 8)`); n != 0 {
		t.Fatalf("%d rows of the batch carry a lock or update mark: the batch locked blue's rows", n)
	}
	if holdsLockOn(t, db, del.pid, "green.items") {
		t.Fatal("the blocked DELETE already reached green: blue's row was not locked by the batch")
	}
	if b := waitLockWait(t, db, "the key change", rekey.pid); !contains32(b, copyPID) {
		t.Fatalf("the key change waits for %v, not for the copy batch %d", b, copyPID)
	}
	if b := waitLockWait(t, db, "the non-key UPDATE", upd.pid); !contains32(b, copyPID) {
		t.Fatalf("the UPDATE waits for %v, not for the copy batch %d", b, copyPID)
	}
	if !holdsLockOn(t, db, upd.pid, "green.items") {
		t.Fatal("the non-key UPDATE is blocked before its trigger reached green (the copy must not block non-key updates)")
	}
	ins.wait("the INSERT into the paused batch's range (it must not be blocked)")
	for _, s := range []*session{del, upd, rekey} {
		if s.finished() {
			t.Fatalf("session %d finished while the batch was still open", s.pid)
		}
	}

	close(p.release)
	del.wait("the DELETE")
	upd.wait("the UPDATE")
	rekey.wait("the key change")
	waitDone(t, "drive to verifying", drive)

	// The copy is over: green must be exact now, with nothing repaired.
	blue := `SELECT id, v, n::bigint FROM public.items`
	green := `SELECT id, v, n FROM green.items`
	db.assertGreenMatches(blue, green)
	if n := scalar[int](db, `SELECT count(*) FROM green.items WHERE id IN (4, 8)`); n != 0 {
		t.Fatalf("%d deleted or re-keyed rows resurrected in green", n)
	}
	if v := scalar[string](db, `SELECT v || '/' || n FROM green.items WHERE id = 6`); v != "updated/-6" {
		t.Fatalf("green row 6 is %q: the batch overwrote the newer version", v)
	}
	if n := scalar[int](db, `SELECT count(*) FROM green.items WHERE id IN (5, 1001)`); n != 2 {
		t.Fatalf("green has %d of the inserted and re-keyed rows, want 2", n)
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	if v := verifyResult(t, db, m.ID); v["mismatched_chunks"].(float64) != 0 {
		t.Fatalf("verification found differences the copy left: %v", v)
	}
	db.assertGreenMatches(blue, green)
}

// Issue 3, done-when 2 (before the read): the first copy batch's transaction
// is paused before its statement reads anything; application transactions
// then change rows of its range and stay open: a DELETE, a DELETE that will
// roll back, a non-key UPDATE, a key change to a key beyond the table's end,
// an INSERT. Released, the batch must wait for the deleters and the key
// changer (for their rows' key buckets), and for the updater on green's key; it must
// skip the deleted and moved rows, copy the row whose delete rolled back, keep
// the updater's newer version, and go on from the right place: the moved row's
// new key must not become the batch's checkpoint (that would skip every row
// between the batch's end and the new key).
func TestIssue3InterleaveBatchPausedBeforeRead(t *testing.T) {
	db := newTestDB(t)
	createItems(db, "items", 40)
	ctx := context.Background()

	// The batch may time out on its lock and retry on another connection:
	// copyPID follows it.
	var copyPID atomic.Int32
	paused, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	db.Runner.Failpoints.CopyBatchStart = func(ctx context.Context, tx pgx.Tx, r backfill.Range) error {
		if r.Last != nil {
			return nil
		}
		var pid int32
		if err := tx.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
			return err
		}
		copyPID.Store(pid)
		var err error
		once.Do(func() {
			close(paused)
			select {
			case <-release:
			case <-ctx.Done():
			}
		})
		return err
	}
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint", BatchSize: 10, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	drive := driveAsync(ctx, db.Runner, m.ID, shadow.Verifying)
	select {
	case <-paused:
	case err := <-drive:
		t.Fatalf("the copy ended before the failpoint: %v", err)
	}

	del, undo, upd, rekey, ins := newSession(t, db), newSession(t, db), newSession(t, db), newSession(t, db), newSession(t, db)
	for _, s := range []*session{del, undo, upd, rekey, ins} {
		s.run(`BEGIN`)
	}
	del.run(`DELETE FROM items WHERE id = 4`)
	upd.run(`UPDATE items SET v = 'updated', n = -6 WHERE id = 6`)
	rekey.run(`UPDATE items SET id = 1001 WHERE id = 8`)
	undo.run(`DELETE FROM items WHERE id = 10`)
	ins.run(`INSERT INTO items VALUES (5, 'inserted', 5)`)
	close(release)

	// The batch needs a lock each of these sessions holds: the key buckets
	// of the deleters' and the key changer's rows (in bucket order), and the
	// updater's uncommitted green row 6 (its insert waits on green's key). End
	// each one only once the batch is seen waiting for it.
	ends := map[*session]string{del: "COMMIT", rekey: "COMMIT", undo: "ROLLBACK", upd: "COMMIT"}
	names := map[*session]string{del: "the DELETE of 4", rekey: "the key change of 8", undo: "the DELETE of 10", upd: "the UPDATE of 6"}
	var order []string
	for len(ends) > 0 {
		var blocker *session
		waitFor(t, "the copy batch to wait for one of the open transactions", 20*time.Second, func() (bool, error) {
			var blockers []int32
			err := db.Pool.QueryRow(ctx, `SELECT pg_blocking_pids($1)`, copyPID.Load()).Scan(&blockers)
			if contains32(blockers, ins.pid) {
				return false, fmt.Errorf("the batch waits for the INSERT of key 5, which its snapshot cannot see")
			}
			for s := range ends {
				if contains32(blockers, s.pid) {
					blocker = s
				}
			}
			return blocker != nil, err
		})
		order = append(order, names[blocker])
		blocker.run(ends[blocker])
		delete(ends, blocker)
	}
	t.Logf("the batch waited for, in turn: %v", order)
	ins.run(`COMMIT`)
	waitDone(t, "drive to verifying", drive)

	blue := `SELECT id, v, n::bigint FROM public.items`
	green := `SELECT id, v, n FROM green.items`
	db.assertGreenMatches(blue, green)
	if n := scalar[int](db, `SELECT count(*) FROM green.items WHERE id IN (4, 8)`); n != 0 {
		t.Fatalf("%d deleted or re-keyed rows resurrected in green", n)
	}
	if v := scalar[string](db, `SELECT v || '/' || n FROM green.items WHERE id = 6`); v != "updated/-6" {
		t.Fatalf("green row 6 is %q: the batch overwrote the newer version", v)
	}
	if n := scalar[int](db, `SELECT count(*) FROM green.items WHERE id IN (5, 10, 1001)`); n != 3 {
		t.Fatalf("green has %d of rows 5, 10, 1001, want 3", n)
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	if v := verifyResult(t, db, m.ID); v["mismatched_chunks"].(float64) != 0 {
		t.Fatalf("verification found differences the copy left: %v", v)
	}
}

// The batch statement with a composite, non-integer key (one range, keyset
// batches over a row comparison): the copy alone makes green exact.
func TestIssue3CopyCompositeTextKey(t *testing.T) {
	db := newTestDB(t)
	db.exec(`CREATE TABLE pairs (region text, no int, v text, PRIMARY KEY (region, no))`,
		`INSERT INTO pairs SELECT 'r' || (g % 7), g, 'v' || g FROM generate_series(1, 3000) g`)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "pairs", Alter: "ALTER COLUMN v TYPE varchar(20)", BatchSize: 200, Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Verifying); err != nil {
		t.Fatal(err)
	}
	db.assertGreenMatches(`SELECT region, no, v::varchar(20) FROM public.pairs`, `SELECT region, no, v FROM green.pairs`)
	if n := scalar[int64](db, `SELECT sum(rows_copied)::bigint FROM shadowctl.copy_ranges WHERE migration_id = $1`, m.ID); n != 3000 {
		t.Fatalf("rows copied %d, want 3000 (each row read once)", n)
	}
}

// The copy's key buckets (rowmap.KeyBuckets): -1 below the span, 0 at its
// start, the last bucket at its end, and no overflow at the ends of bigint.
func TestCopyGuardBuckets(t *testing.T) {
	db := newTestDB(t)
	k := rowmap.NewKeyBuckets(7, "id", 1, 2_000_000)
	for _, c := range []struct {
		value string
		want  int
	}{
		{"0", -1}, {"1", 0}, {"2000000", rowmap.KeyBucketCount - 1},
		{"(-9223372036854775808)", -1}, {"9223372036854775807", 2147483647},
	} {
		if got := scalar[int](db, `SELECT `+k.Bucket(c.value+"::bigint")); got != c.want {
			t.Errorf("bucket of %s = %d, want %d", c.value, got, c.want)
		}
	}
}

// batchWaitingOnOpenDelete starts a trigger-sync copy of items (keys 2, 4,
// … 2000: 256 buckets of 8 keys, so 2–8 share one) whose first batch waits
// for its key bucket: an open transaction (del) deleted key 6 just before
// the batch took its locks. patience is the runner's CopyGuardPatience.
func batchWaitingOnOpenDelete(t *testing.T, patience time.Duration) (db *testDB, m *shadow.Migration, drive chan error, del *session) {
	db = newTestDB(t)
	createItems(db, "items", 1000)
	ctx := context.Background()
	db.Runner.CopyGuardPatience = patience
	p := newPause()
	db.Runner.Failpoints.CopyBatchStart = func(ctx context.Context, tx pgx.Tx, r backfill.Range) error {
		p.hold(ctx)
		return nil
	}
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint", BatchSize: 10, Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	drive = driveAsync(ctx, db.Runner, m.ID, shadow.Verifying)
	<-p.paused
	del = newSession(t, db)
	del.run(`BEGIN`)
	del.run(`DELETE FROM items WHERE id = 6`) // its trigger holds the bucket of 2–8 until the end
	close(p.release)
	waitFor(t, "the batch to wait for its bucket", 20*time.Second, func() (bool, error) {
		var n int
		err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ExclusiveLock' AND NOT granted`).Scan(&n)
		return n > 0, err
	})
	return db, m, drive, del
}

// A copy batch waits for an application transaction that deleted a row in
// its key bucket, in short lock_timeout steps (so that the application's
// other deletes never queue behind it for long), up to the runner's
// CopyGuardPatience in all; then the copy fails with an error that names the
// likely cause, rather than waiting for ever or after a fixed number of
// tries.
func TestCopyGuardWaitsForAnOpenDeleteThenGivesUp(t *testing.T) {
	db, _, drive, del := batchWaitingOnOpenDelete(t, 1500*time.Millisecond)
	start := time.Now() // the batch waits already
	// While the batch waits, another delete in the same bucket goes through
	// within about one lock_timeout step of the batch (100 ms), not after
	// the batch's whole wait: a lock request queues behind a waiting
	// conflicting one, so it waits for the batch to give up its try.
	other := newSession(t, db)
	t0 := time.Now()
	other.run(`DELETE FROM items WHERE id = 8`)
	if d := time.Since(t0); d > 500*time.Millisecond {
		t.Fatalf("a delete in the waiting batch's bucket took %s: it queued behind the batch", d)
	}
	var err error
	select {
	case err = <-drive:
	case <-time.After(time.Minute):
		t.Fatal("the copy still waits a minute later, with a patience of 1.5 s")
	}
	took := time.Since(start)
	del.run(`ROLLBACK`)
	if err == nil || !strings.Contains(err.Error(), "key-bucket locks") || !strings.Contains(err.Error(), "long transactions") {
		t.Fatalf("drive: %v, want the batch's key-bucket wait named, with its likely cause", err)
	}
	// Its patience counts from its first timed-out try, a lock_timeout step
	// after it began to wait (less what waitFor took to see it waiting).
	if took < db.Runner.CopyGuardPatience-300*time.Millisecond {
		t.Fatalf("the copy gave up %s after it was seen waiting, before its patience of %s", took, db.Runner.CopyGuardPatience)
	}
}

// A pause reaches a batch that waits for its key buckets (patience 5 min):
// the copy stops within seconds, not at the end of the wait.
func TestCopyGuardWaitNoticesAPause(t *testing.T) {
	db, m, drive, del := batchWaitingOnOpenDelete(t, 0)
	if err := db.Runner.Store.Pause(context.Background(), m.ID, "test"); err != nil {
		t.Fatal(err)
	}
	var err error
	select {
	case err = <-drive:
	case <-time.After(30 * time.Second):
		t.Fatal("the copy still waits for its bucket 30 s after a pause")
	}
	del.run(`ROLLBACK`)
	if !errors.Is(err, shadow.ErrStopped) {
		t.Fatalf("drive: %v, want ErrStopped (paused)", err)
	}
}

package sync

// This file: the logical-replication sync. Blue's changes are read from a
// logical replication slot (pgoutput) and applied to green by this process,
// so the application's write path carries no trigger of the tool's.
//
// Exactness: the initial copy reads blue's current rows after the slot was
// created, and the whole stream from the slot's consistent point is applied
// after the copy, in commit order. Apply is idempotent (upserts and deletes
// by key; an unchanged TOASTed value is taken from green's row, else blue's):
// replaying a change that a copied row already reflects is harmless, and the
// last change of every key sets it as blue has it. Each green transaction
// also records the WAL position it covers (Position), and the slot's
// confirmed position only moves after that commit; after a crash,
// transactions at or below the recorded position are skipped.

import (
	"context"
	"errors"
	"fmt"
	"strings"
	gosync "sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/pace"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/retry"
	"github.com/shadowctl/shadowctl/internal/rowmap"
)

// Operator-facing conditions of the logical sync.
var (
	ErrTruncate        = errors.New("TRUNCATE on blue: green can no longer follow it")
	ErrRelationChanged = errors.New("blue's definition changed (DDL on blue) while the logical sync ran")
	ErrWALLimit        = errors.New("the replication slot retains more WAL than allowed")
)

// MarkerPrefix is the logical-decoding message prefix of catch-up markers:
// the applier commits everything before one at once. A marker whose content
// starts with UrgentMarker also makes it read the stream without gulping
// for a while (see gulp.go): the application is held back, or soon will be.
const (
	MarkerPrefix = "shadowctl"
	UrgentMarker = "urgent "
)

// Slot is a freshly created replication slot.
type Slot struct {
	Name            string
	ConsistentPoint pglogrepl.LSN
}

// ReplicationConfig turns an ordinary connection config into a logical
// replication one.
func ReplicationConfig(cfg *pgx.ConnConfig) *pgconn.Config {
	c := cfg.Config.Copy()
	c.RuntimeParams["replication"] = "database"
	return c
}

// CreateSlot creates a logical slot with pgoutput. It waits for
// transactions running at that moment to finish (PostgreSQL needs a
// consistent point), bounded by ctx; every transaction that commits after
// the returned ConsistentPoint is in the stream, every one before it is
// visible to any snapshot taken afterwards.
//
// No snapshot is exported: keeping one open for the copy would hold back
// the xmin horizon for as long as the copy runs, which stops the pruning of
// blue's updated rows and slows the application (docs/logical.md).
func CreateSlot(ctx context.Context, cfg *pgconn.Config, name string) (*Slot, error) {
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("replication connection: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	res, err := pglogrepl.CreateReplicationSlot(ctx, conn, name, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{SnapshotAction: "NOEXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	if err != nil {
		return nil, fmt.Errorf("create replication slot %s: %w", name, err)
	}
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		return nil, err
	}
	return &Slot{Name: name, ConsistentPoint: lsn}, nil
}

// DropSlot removes a slot (ending the session that reads it, if any). It is a
// no-op when the slot does not exist.
func DropSlot(ctx context.Context, q pgsql.Querier, name string) error {
	for attempt := 0; attempt < 50; attempt++ {
		var active *int32
		err := q.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, name).Scan(&active)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		if active != nil {
			_, _ = q.Exec(ctx, `SELECT pg_terminate_backend($1)`, *active)
		}
		_, err = q.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, name)
		if err == nil {
			return nil
		}
		if pgsql.Code(err) != "55006" { // object in use: the walsender is still exiting
			return fmt.Errorf("drop replication slot %s: %w", name, err)
		}
		if err := retry.Sleep(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
	return fmt.Errorf("drop replication slot %s: still in use", name)
}

// Applier streams a slot and applies blue's changes to green.
type Applier struct {
	ReplConfig  *pgconn.Config
	Pool        *pgxpool.Pool
	Slot        string
	Publication string
	Mapping     rowmap.Mapping
	// SourceColumns is blue's definition when the sync started: a relation
	// message that differs means DDL on blue.
	SourceColumns []pgmeta.Column
	// LoadPosition reads the applied WAL position from the catalog;
	// SavePosition is the statement that records it, which runs inside the
	// green transaction it covers, sent with that transaction's changes
	// (or by itself, for a marker with nothing to apply before it).
	LoadPosition func(ctx context.Context) (pglogrepl.LSN, error)
	SavePosition func(lsn pglogrepl.LSN, at time.Time) (sql string, args []any)
	// MaxRetainedWAL stops the sync when the slot holds more WAL (0: no limit).
	MaxRetainedWAL int64
	// FlushEvery bounds how long applied changes wait before their green
	// transaction commits (grouping small upstream transactions); default
	// DefaultFlushEvery. A marker commits at once, whatever it says.
	FlushEvery time.Duration
	// Pace, when set, paces the apply while the application is busy: after
	// each piece green applied, the writer rests in proportion, so the
	// reader stops reading and the WAL sender, once the socket is full,
	// stops decoding. It matters for a backlog (the copy's), which would
	// otherwise be drained flat out on the application's cores. While
	// markers come (a verification or a swap waits on the apply) there is
	// no pace, and green commits every awaitedFlushEvery.
	Pace pace.Func
	Log  zerolog.Logger

	applied     atomic.Uint64
	lastCommit  atomic.Int64  // unix nanos of the last applied upstream commit
	awaitedTill atomic.Int64  // unix nanos: somebody waits on the apply (markers)
	urgentTill  atomic.Int64  // unix nanos: a cutover waits (urgent markers); no gulping
	awaited     chan struct{} // wakes a resting writer for a marker
	serverEnd   atomic.Uint64
	caughtUp    atomic.Bool
	changes     atomic.Int64

	// Set by planGrouping: the key's columns in SourceColumns, whether
	// changes of different keys may share a statement, whether a repeated
	// upsert of a key may replace the first in a group, and whether an
	// update whose key text is unchanged stays at its green row.
	keyCols        []int
	groupable      bool
	mergeUpserts   bool
	sameKeySameRow bool

	stmtMu gosync.Mutex
	stmts  map[string]string // SQL by statement shape
}

// Applied is the WAL position green has committed up to.
func (a *Applier) Applied() pglogrepl.LSN { return pglogrepl.LSN(a.applied.Load()) }

// Lag reports how far green is behind: WAL bytes not yet applied (as seen
// from the last message of the server) and the age of the oldest unapplied
// commit (0 when caught up).
func (a *Applier) Lag() (bytes int64, seconds float64) {
	end, app := a.serverEnd.Load(), a.applied.Load()
	if end > app {
		bytes = int64(end - app)
	}
	if !a.caughtUp.Load() {
		if lc := a.lastCommit.Load(); lc > 0 {
			seconds = time.Since(time.Unix(0, lc)).Seconds()
		}
	}
	return bytes, seconds
}

// pending is the open green transaction as the reader sees it: what it
// covers so far and the statements not yet handed to the writer.
type pending struct {
	b       batcher
	rows    int // changes in the green transaction
	commits int
	endLSN  pglogrepl.LSN
	at      time.Time
	opened  time.Time
}

// work is a piece of the green transaction for the writer, in stream order.
type work struct {
	stmts []queued
	// commit: save endLSN (covering the commit at `at`) and commit.
	commit bool
	endLSN pglogrepl.LSN
	at     time.Time
	// marker > 0: record it as applied, by itself (nothing to commit).
	marker pglogrepl.LSN
}

// DefaultFlushEvery: at the tip, a green transaction commits every 200 ms.
// Each commit costs this process and green's backend four round trips
// (wake-ups on both sides) and a WAL flush; at 50 ms they were a tenth of
// the sync's CPU at 1,000 upstream transactions a second. Nobody waits on
// the difference: catch-ups and the cutover wait on markers, which commit
// at once.
const DefaultFlushEvery = 200 * time.Millisecond

const (
	// awaitedFor: after a marker, the apply counts as awaited this long (a
	// verification sends one per chunk it finds behind); after an urgent
	// marker, eagerAfterMarker.
	awaitedFor = 2 * time.Second
	// awaitedFlushEvery: the commit interval while awaited. A verification
	// compares a chunk of blue with green as green has it: the shorter
	// green's lag, the fewer chunks it finds behind and compares again.
	awaitedFlushEvery = 50 * time.Millisecond
)

// Sizes of the green transaction during a backlog (measured with
// integration.BenchmarkLogicalApply; see docs/logical.md).
const (
	// handOffRows, handOffBytes: statements go to the writer once they carry
	// this many changes or bytes of values, so the reader decodes the next
	// ones while green applies them. The bytes keep wide rows from making
	// huge statements (the server materializes the rows of one).
	handOffRows  = 4000
	handOffBytes = 4 << 20
	// commitRows: the green transaction commits at the first upstream
	// commit past this many changes (else every FlushEvery).
	commitRows = 20000
)

// Run applies the stream until ctx ends or an error stops it (ErrTruncate,
// ErrRelationChanged, ErrWALLimit, or a database error).
//
// Two goroutines: this one reads and decodes the stream and builds the
// statements; a writer applies them to green in order, one green
// transaction at a time. Only the writer moves Applied, after its commit.
func (a *Applier) Run(ctx context.Context) error {
	if a.FlushEvery <= 0 {
		a.FlushEvery = DefaultFlushEvery
	}
	a.awaited = make(chan struct{}, 1)
	if err := a.planGrouping(ctx); err != nil {
		return err
	}
	start, err := a.LoadPosition(ctx)
	if err != nil {
		return err
	}
	a.applied.Store(uint64(start))
	conn, err := pgconn.ConnectConfig(ctx, gulping(a.ReplConfig, readPause, &a.urgentTill))
	if err != nil {
		return fmt.Errorf("replication connection: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	err = pglogrepl.StartReplication(ctx, conn, a.Slot, start, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names " + pgsql.Literal(a.Publication), "messages 'true'"},
	})
	if err != nil {
		return fmt.Errorf("start replication on slot %s: %w", a.Slot, err)
	}
	a.Log.Info().Str("slot", a.Slot).Str("from", start.String()).Bool("grouped", a.groupable).Bool("merged", a.mergeUpserts).Msg("logical sync streaming")

	// The writer. Two pieces in the queue at most: memory stays bounded and
	// a slow green slows the reader down.
	rctx, stopReading := context.WithCancel(ctx)
	defer stopReading()
	queue := make(chan work, 2)
	var (
		outstanding atomic.Int64 // pieces handed over and not yet applied
		writeErr    error
		writerDone  = make(chan struct{})
	)
	go func() {
		defer close(writerDone)
		if err := a.write(ctx, queue, &outstanding); err != nil {
			writeErr = err
			stopReading()
		}
	}()
	defer func() {
		close(queue)
		<-writerDone
	}()
	// ended is the error to return once rctx is done: ctx ended, or else
	// the writer failed.
	ended := func() error {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		<-writerDone
		return writeErr
	}
	handOff := func(w work) error {
		outstanding.Add(1)
		select {
		case queue <- w:
			return nil
		case <-rctx.Done():
			outstanding.Add(-1)
			return ended()
		}
	}

	// Receive with a deadline on the socket rather than a context per
	// message: a timer and pgconn's context watcher for every message cost
	// more than decoding it. When the run ends, wake moves the deadline to
	// now (after the loop set its own, so a blocked read returns at once).
	nc := conn.Conn()
	wake := context.AfterFunc(rctx, func() { _ = nc.SetReadDeadline(time.Now()) })
	defer wake()
	var deadline time.Time

	var (
		cur        *pending
		inTx       bool
		skipTx     bool
		txFinal    pglogrepl.LSN
		nextStatus = time.Now()
		nextWALChk = time.Now()
		ackLSN     = start
	)
	// idle: green has committed everything received so far.
	idle := func() bool { return !inTx && cur == nil && outstanding.Load() == 0 }
	flush := func() error {
		if cur == nil {
			return nil
		}
		p := cur
		cur = nil
		return handOff(work{stmts: p.b.take(), commit: true, endLSN: p.endLSN, at: p.at})
	}
	for {
		if time.Now().After(nextStatus) {
			// Acknowledge only what green has committed.
			ack := a.Applied()
			if idle() && ackLSN > ack {
				ack = ackLSN
			}
			if err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: ack}); err != nil {
				return fmt.Errorf("standby status: %w", err)
			}
			lagBytes, lagSec := a.Lag()
			a.Log.Debug().Int64("changes", a.changes.Swap(0)).Int64("lag_bytes", lagBytes).Float64("lag_s", lagSec).Str("applied", a.Applied().String()).Msg("logical sync")
			nextStatus = time.Now().Add(time.Second)
		}
		if a.MaxRetainedWAL > 0 && time.Now().After(nextWALChk) {
			nextWALChk = time.Now().Add(2 * time.Second)
			if err := CheckRetainedWAL(ctx, a.Pool, a.Slot, a.MaxRetainedWAL); err != nil {
				return err
			}
		}
		flushEvery := a.FlushEvery
		if a.isAwaited() {
			flushEvery = min(flushEvery, awaitedFlushEvery)
		}
		if cur != nil && !inTx && time.Since(cur.opened) >= flushEvery {
			if err := flush(); err != nil {
				return err
			}
		}
		until := nextStatus
		if cur != nil && !inTx && cur.opened.Add(flushEvery).Before(until) {
			until = cur.opened.Add(flushEvery)
		}
		if soon := time.Now().Add(time.Millisecond); until.Before(soon) {
			until = soon
		}
		if !until.Equal(deadline) {
			if err := nc.SetReadDeadline(until); err != nil {
				return fmt.Errorf("replication stream: %w", err)
			}
			deadline = until
		}
		if rctx.Err() != nil { // checked after setting the deadline: see wake
			return ended()
		}
		raw, err := conn.ReceiveMessage(context.Background())
		if err != nil {
			if rctx.Err() != nil {
				return ended()
			}
			if pgconn.Timeout(err) {
				continue
			}
			return fmt.Errorf("replication stream: %w", err)
		}
		if e, ok := raw.(*pgproto3.ErrorResponse); ok {
			return fmt.Errorf("replication stream: %s (SQLSTATE %s)", e.Message, e.Code)
		}
		msg, ok := raw.(*pgproto3.CopyData)
		if !ok || len(msg.Data) == 0 {
			continue
		}
		switch msg.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			pkm, err := pglogrepl.ParsePrimaryKeepaliveMessage(msg.Data[1:])
			if err != nil {
				return err
			}
			a.serverEnd.Store(uint64(max(pkm.ServerWALEnd, pglogrepl.LSN(a.serverEnd.Load()))))
			if !inTx && cur == nil {
				ackLSN = max(ackLSN, pkm.ServerWALEnd)
				if outstanding.Load() == 0 {
					a.caughtUp.Store(true)
				}
			}
			if pkm.ReplyRequested {
				nextStatus = time.Time{}
			}
		case pglogrepl.XLogDataByteID:
			xld, err := pglogrepl.ParseXLogData(msg.Data[1:])
			if err != nil {
				return err
			}
			a.serverEnd.Store(uint64(max(xld.ServerWALEnd, pglogrepl.LSN(a.serverEnd.Load()))))
			m, err := pglogrepl.Parse(xld.WALData)
			if err != nil {
				return fmt.Errorf("decode pgoutput: %w", err)
			}
			switch m := m.(type) {
			case *pglogrepl.RelationMessage:
				if err := a.checkRelation(m); err != nil {
					return err
				}
			case *pglogrepl.BeginMessage:
				inTx, txFinal = true, m.FinalLSN
				a.caughtUp.Store(false)
				// Already applied before a restart: skip the whole transaction.
				skipTx = txFinal < a.Applied()
			case *pglogrepl.CommitMessage:
				inTx = false
				if skipTx {
					continue
				}
				if cur == nil { // a transaction with nothing for green
					ackLSN = max(ackLSN, m.TransactionEndLSN)
					continue
				}
				cur.endLSN, cur.at = m.TransactionEndLSN, m.CommitTime
				cur.commits++
				if cur.rows >= commitRows {
					if err := flush(); err != nil {
						return err
					}
				}
			case *pglogrepl.InsertMessage, *pglogrepl.UpdateMessage, *pglogrepl.DeleteMessage:
				if skipTx {
					continue
				}
				if cur == nil {
					cur = &pending{b: batcher{a: a}, opened: time.Now()}
				}
				a.changes.Add(1)
				cur.rows++
				if err := cur.b.add(m); err != nil {
					return err
				}
				if cur.b.rows >= handOffRows || cur.b.bytes >= handOffBytes {
					// Apply what we have inside the open green transaction.
					if err := handOff(work{stmts: cur.b.take()}); err != nil {
						return err
					}
				}
			case *pglogrepl.TruncateMessage:
				return fmt.Errorf("%w (%s); abort this migration and start again", ErrTruncate, a.Mapping.Source)
			case *pglogrepl.LogicalDecodingMessage:
				if m.Prefix != MarkerPrefix {
					continue
				}
				// Somebody waits on this marker: no pace for a while. A
				// cutover, maybe with the application held back, also
				// has the next ones read at once.
				a.awaitedTill.Store(time.Now().Add(awaitedFor).UnixNano())
				if strings.HasPrefix(string(m.Content), UrgentMarker) {
					a.urgentTill.Store(time.Now().Add(eagerAfterMarker).UnixNano())
				}
				select {
				case a.awaited <- struct{}{}:
				default:
				}
				// Everything committed before the marker has been received:
				// commit it and record the marker's position as applied,
				// in the same green transaction when there is one (under
				// a swap's lock every commit is the application's wait).
				if cur != nil {
					cur.endLSN = max(cur.endLSN, m.LSN)
					if err := flush(); err != nil {
						return err
					}
				} else if err := handOff(work{marker: m.LSN}); err != nil {
					return err
				}
				ackLSN = max(ackLSN, m.LSN)
			}
		}
	}
}

// write applies the pieces in order until the queue is closed. An open green
// transaction is rolled back when it ends early.
func (a *Applier) write(ctx context.Context, queue <-chan work, outstanding *atomic.Int64) (err error) {
	var tx pgx.Tx
	defer func() {
		if tx != nil {
			_ = tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	for w := range queue {
		started := time.Now()
		b := &pgx.Batch{}
		if tx == nil && (len(w.stmts) > 0 || w.commit) {
			if tx, err = a.Pool.Begin(ctx); err != nil {
				return fmt.Errorf("apply to %s: begin: %w", a.Mapping.Target, err)
			}
			// The statements take arrays whose length changes every time:
			// custom plans would re-plan each execution (about a
			// millisecond), and the generic plan is the right one anyway.
			b.Queue("SET LOCAL plan_cache_mode = force_generic_plan")
		}
		for _, s := range w.stmts {
			b.Queue(s.sql, s.args...)
		}
		if w.commit {
			sql, args := a.SavePosition(w.endLSN, w.at)
			b.Queue(sql, args...)
		}
		if b.Len() > 0 {
			if err := tx.SendBatch(ctx, b).Close(); err != nil {
				return fmt.Errorf("apply to %s: %w", a.Mapping.Target, err)
			}
		}
		if w.commit {
			err := tx.Commit(ctx)
			tx = nil
			if err != nil {
				return fmt.Errorf("apply to %s: commit: %w", a.Mapping.Target, err)
			}
			a.applied.Store(uint64(max(w.endLSN, a.Applied())))
			a.lastCommit.Store(w.at.UnixNano())
		}
		if w.marker > 0 {
			if err := a.savePositionNow(ctx, w.marker); err != nil {
				return err
			}
			a.applied.Store(uint64(max(w.marker, a.Applied())))
		}
		outstanding.Add(-1)
		if err := a.rest(ctx, time.Since(started)); err != nil {
			return err
		}
	}
	return nil
}

// isAwaited: a marker came recently (see awaitedFor), or a cutover's.
func (a *Applier) isAwaited() bool {
	now := time.Now().UnixNano()
	return now < a.awaitedTill.Load() || now < a.urgentTill.Load()
}

// rest paces the writer after a piece that took took (see Pace); a marker
// read meanwhile ends the rest.
func (a *Applier) rest(ctx context.Context, took time.Duration) error {
	if a.Pace == nil || a.isAwaited() {
		return nil
	}
	p := a.Pace(ctx)
	d := p.Rest(took)
	if !p.Busy || d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-a.awaited:
		return nil
	case <-t.C:
		return nil
	}
}

// savePositionNow records lsn as applied in one statement of its own.
func (a *Applier) savePositionNow(ctx context.Context, lsn pglogrepl.LSN) error {
	sql, args := a.SavePosition(lsn, time.Now())
	if _, err := a.Pool.Exec(ctx, sql, args...); err != nil {
		return fmt.Errorf("record the applied position: %w", err)
	}
	return nil
}

// checkRelation fails on a relation message that does not describe blue as
// it was when the sync started.
func (a *Applier) checkRelation(m *pglogrepl.RelationMessage) error {
	if m.Namespace != a.Mapping.Source.Schema || m.RelationName != a.Mapping.Source.Name {
		return fmt.Errorf("%w: the stream carries %s.%s, not %s", ErrRelationChanged, m.Namespace, m.RelationName, a.Mapping.Source)
	}
	var got, want []string
	for _, c := range m.Columns {
		got = append(got, fmt.Sprintf("%s:%d:%d", c.Name, c.DataType, c.TypeModifier))
	}
	for _, c := range a.SourceColumns {
		want = append(want, fmt.Sprintf("%s:%d:%d", c.Name, c.TypeOID, c.TypeMod))
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		return fmt.Errorf("%w: columns are now (%s), were (%s); abort this migration and start again", ErrRelationChanged, strings.Join(got, ", "), strings.Join(want, ", "))
	}
	return nil
}

// CheckRetainedWAL fails with ErrWALLimit when the slot holds more WAL than
// limit bytes.
func CheckRetainedWAL(ctx context.Context, q pgsql.Querier, slot string, limit int64) error {
	var retained *int64
	err := q.QueryRow(ctx, `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&retained)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("replication slot %s is gone", slot)
	}
	if err != nil {
		return err
	}
	if retained != nil && *retained > limit {
		return fmt.Errorf("%w: slot %s retains %d bytes of WAL, limit %d (the sync fell behind or stopped; the slot is dropped so the disk does not fill)", ErrWALLimit, slot, *retained, limit)
	}
	return nil
}

package sync

// This file: the logical-replication sync. Blue's changes are read from a
// logical replication slot (pgoutput) and applied to green by this process,
// so the application's write path carries no trigger of the tool's.
//
// Exactness: the initial copy reads blue inside the snapshot exported when
// the slot was created, and the stream is applied from the slot's consistent
// point: no gap, no double apply. Each green transaction also records the
// WAL position it covers (Position), and the slot's confirmed position only
// moves after that commit; after a crash, transactions at or below the
// recorded position are skipped. Apply is idempotent anyway (upserts and
// deletes by key), which is also what makes a copy resumed without the
// snapshot converge.

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

// MarkerPrefix is the logical-decoding message prefix of cutover markers.
const MarkerPrefix = "shadowctl"

// Slot is a freshly created replication slot whose exported snapshot stays
// usable while its connection is open and idle.
type Slot struct {
	Name            string
	ConsistentPoint pglogrepl.LSN
	Snapshot        string
	conn            *pgconn.PgConn
}

// Close ends the exporting connection (and with it the snapshot).
func (s *Slot) Close(ctx context.Context) {
	if s != nil && s.conn != nil {
		_ = s.conn.Close(ctx)
		s.conn = nil
	}
}

// ReplicationConfig turns an ordinary connection config into a logical
// replication one.
func ReplicationConfig(cfg *pgx.ConnConfig) *pgconn.Config {
	c := cfg.Config.Copy()
	c.RuntimeParams["replication"] = "database"
	return c
}

// CreateSlot creates a logical slot with pgoutput and exports its snapshot.
// It waits for transactions running at that moment to finish (PostgreSQL
// needs a consistent point), bounded by ctx.
func CreateSlot(ctx context.Context, cfg *pgconn.Config, name string) (*Slot, error) {
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("replication connection: %w", err)
	}
	res, err := pglogrepl.CreateReplicationSlot(ctx, conn, name, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	if err != nil {
		conn.Close(ctx)
		return nil, fmt.Errorf("create replication slot %s: %w", name, err)
	}
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		conn.Close(ctx)
		return nil, err
	}
	return &Slot{Name: name, ConsistentPoint: lsn, Snapshot: res.SnapshotName, conn: conn}, nil
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
	// Position reads and writes the applied WAL position in the catalog;
	// Save runs inside the green transaction it covers.
	LoadPosition func(ctx context.Context) (pglogrepl.LSN, error)
	SavePosition func(ctx context.Context, tx pgx.Tx, lsn pglogrepl.LSN, at time.Time) error
	// MaxRetainedWAL stops the sync when the slot holds more WAL (0: no limit).
	MaxRetainedWAL int64
	// FlushEvery bounds how long applied changes wait before their green
	// transaction commits (grouping small upstream transactions).
	FlushEvery time.Duration
	Log        zerolog.Logger

	applied    atomic.Uint64
	lastCommit atomic.Int64 // unix nanos of the last applied upstream commit
	serverEnd  atomic.Uint64
	caughtUp   atomic.Bool
	changes    atomic.Int64

	stmtMu gosync.Mutex
	stmts  map[string]string
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

// pending is the open green transaction and what it covers.
type pending struct {
	tx      pgx.Tx
	batch   *pgx.Batch
	commits int
	endLSN  pglogrepl.LSN
	at      time.Time
	opened  time.Time
}

// Run applies the stream until ctx ends or an error stops it (ErrTruncate,
// ErrRelationChanged, ErrWALLimit, or a database error).
func (a *Applier) Run(ctx context.Context) error {
	if a.FlushEvery <= 0 {
		a.FlushEvery = 50 * time.Millisecond
	}
	start, err := a.LoadPosition(ctx)
	if err != nil {
		return err
	}
	a.applied.Store(uint64(start))
	conn, err := pgconn.ConnectConfig(ctx, a.ReplConfig)
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
	a.Log.Info().Str("slot", a.Slot).Str("from", start.String()).Msg("logical sync streaming")

	var (
		cur        *pending
		inTx       bool
		skipTx     bool
		txFinal    pglogrepl.LSN
		relOK      = map[uint32]bool{}
		nextStatus = time.Now()
		nextWALChk = time.Now()
		ackLSN     = start
	)
	flush := func() error {
		if cur == nil {
			return nil
		}
		p := cur
		cur = nil
		if err := a.SavePosition(ctx, p.tx, p.endLSN, p.at); err != nil {
			_ = p.tx.Rollback(ctx)
			return err
		}
		if p.batch.Len() > 0 {
			if err := p.tx.SendBatch(ctx, p.batch).Close(); err != nil {
				_ = p.tx.Rollback(ctx)
				return fmt.Errorf("apply to %s: %w", a.Mapping.Target, err)
			}
		}
		if err := p.tx.Commit(ctx); err != nil {
			return fmt.Errorf("apply to %s: commit: %w", a.Mapping.Target, err)
		}
		a.applied.Store(uint64(p.endLSN))
		a.lastCommit.Store(p.at.UnixNano())
		return nil
	}
	defer func() {
		if cur != nil {
			_ = cur.tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	for {
		if time.Now().After(nextStatus) {
			// Acknowledge only what green has committed.
			ack := a.Applied()
			if !inTx && cur == nil && ackLSN > ack {
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
		if cur != nil && !inTx && time.Since(cur.opened) >= a.FlushEvery {
			if err := flush(); err != nil {
				return err
			}
		}
		wait := time.Until(nextStatus)
		if cur != nil && !inTx {
			wait = min(wait, a.FlushEvery-time.Since(cur.opened))
		}
		rctx, cancel := context.WithTimeout(ctx, max(wait, time.Millisecond))
		raw, err := conn.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
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
				a.caughtUp.Store(true)
				ackLSN = max(ackLSN, pkm.ServerWALEnd)
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
				relOK[m.RelationID] = true
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
				if cur.batch.Len() >= 2000 {
					if err := flush(); err != nil {
						return err
					}
				}
			case *pglogrepl.InsertMessage, *pglogrepl.UpdateMessage, *pglogrepl.DeleteMessage:
				if skipTx {
					continue
				}
				if cur == nil {
					tx, err := a.Pool.Begin(ctx)
					if err != nil {
						return err
					}
					cur = &pending{tx: tx, batch: &pgx.Batch{}, opened: time.Now()}
				}
				a.changes.Add(1)
				if err := a.queue(cur.batch, m); err != nil {
					return err
				}
				if cur.batch.Len() >= 500 {
					// Send what we have inside the open transaction.
					if err := cur.tx.SendBatch(ctx, cur.batch).Close(); err != nil {
						return fmt.Errorf("apply to %s: %w", a.Mapping.Target, err)
					}
					cur.batch = &pgx.Batch{}
				}
			case *pglogrepl.TruncateMessage:
				return fmt.Errorf("%w (%s); abort this migration and start again", ErrTruncate, a.Mapping.Source)
			case *pglogrepl.LogicalDecodingMessage:
				if m.Prefix != MarkerPrefix {
					continue
				}
				// Everything committed before the marker has been received:
				// commit it and record the marker's position as applied.
				if err := flush(); err != nil {
					return err
				}
				if err := a.savePositionNow(ctx, m.LSN); err != nil {
					return err
				}
				a.applied.Store(uint64(max(m.LSN, a.Applied())))
				ackLSN = max(ackLSN, m.LSN)
			}
		}
	}
}

func (a *Applier) savePositionNow(ctx context.Context, lsn pglogrepl.LSN) error {
	return pgx.BeginFunc(ctx, a.Pool, func(tx pgx.Tx) error {
		return a.SavePosition(ctx, tx, lsn, time.Now())
	})
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

// queue adds the green statement(s) for one change to the batch.
func (a *Applier) queue(b *pgx.Batch, m pglogrepl.Message) error {
	switch m := m.(type) {
	case *pglogrepl.InsertMessage:
		sql, args := a.upsert(m.Tuple)
		b.Queue(sql, args...)
	case *pglogrepl.UpdateMessage:
		if m.OldTuple != nil { // the key changed: remove the row at the old key
			sql, args := a.delete(m.OldTuple)
			b.Queue(sql, args...)
		}
		sql, args := a.upsert(m.NewTuple)
		b.Queue(sql, args...)
	case *pglogrepl.DeleteMessage:
		if m.OldTuple == nil {
			return fmt.Errorf("a DELETE on %s came without its key (replica identity NOTHING?)", a.Mapping.Source)
		}
		sql, args := a.delete(m.OldTuple)
		b.Queue(sql, args...)
	}
	return nil
}

// sourceRow renders blue's row from a tuple as a one-row subquery of typed
// parameters. Unchanged TOASTed values ('u') are not in the stream: they are
// taken from green's copy when a green column carries that blue column as it
// is, else from blue's current row.
func (a *Applier) sourceRow(t *pglogrepl.TupleData, keyOnly bool) (string, []any) {
	var args []any
	param := make([]int, len(a.SourceColumns)) // 1-based parameter of each text value
	keyVals := map[string]int{}
	for i, c := range a.SourceColumns {
		if i < len(t.Columns) && t.Columns[i].DataType == pglogrepl.TupleDataTypeText {
			args = append(args, string(t.Columns[i].Data))
			param[i] = len(args)
			keyVals[c.Name] = len(args)
		}
	}
	var cols []string
	for i, c := range a.SourceColumns {
		if i >= len(t.Columns) {
			break
		}
		switch t.Columns[i].DataType {
		case pglogrepl.TupleDataTypeText:
			cols = append(cols, fmt.Sprintf("$%d::text::%s AS %s", param[i], c.Type, pgsql.Ident(c.Name)))
		case pglogrepl.TupleDataTypeNull:
			if keyOnly {
				continue
			}
			cols = append(cols, fmt.Sprintf("NULL::%s AS %s", c.Type, pgsql.Ident(c.Name)))
		case pglogrepl.TupleDataTypeToast:
			cols = append(cols, fmt.Sprintf("(%s)::%s AS %s", a.unchangedValue(c, keyVals), c.Type, pgsql.Ident(c.Name)))
		}
	}
	return "(SELECT " + strings.Join(cols, ", ") + ")", args
}

// unchangedValue is SQL for the current value of an unchanged TOASTed column,
// found by the row's key (bound as parameters already).
func (a *Applier) unchangedValue(c pgmeta.Column, keyVals map[string]int) string {
	m := a.Mapping
	var conds []string
	for _, k := range m.SourceKey {
		if n, ok := keyVals[k]; ok {
			conds = append(conds, fmt.Sprintf("%%s.%s = $%d::text::%s", pgsql.Ident(k), n, keyType(m, k)))
		}
	}
	for _, gc := range m.Columns {
		if gc.Source == c.Name {
			return fmt.Sprintf("SELECT g.%s FROM ONLY %s AS g WHERE %s", pgsql.Ident(gc.Target), m.Target.Quoted(), fmtAll(conds, "g"))
		}
	}
	return fmt.Sprintf("SELECT b.%s FROM ONLY %s AS b WHERE %s", pgsql.Ident(c.Name), m.Source.Quoted(), fmtAll(conds, "b"))
}

func keyType(m rowmap.Mapping, k string) string {
	for i, s := range m.SourceKey {
		if s == k {
			return m.SourceKeyTypes[i]
		}
	}
	return "text"
}

func fmtAll(conds []string, alias string) string {
	if len(conds) == 0 {
		return "false"
	}
	out := make([]string, len(conds))
	for i, c := range conds {
		out[i] = fmt.Sprintf(c, alias)
	}
	return strings.Join(out, " AND ")
}

func (a *Applier) upsert(t *pglogrepl.TupleData) (string, []any) {
	return a.statement('u', t, false, func(row string) string {
		m := a.Mapping
		return m.InsertSelect(row) + " " + m.OnConflictUpdate()
	})
}

func (a *Applier) delete(t *pglogrepl.TupleData) (string, []any) {
	return a.statement('d', t, true, func(row string) string {
		m := a.Mapping
		return fmt.Sprintf("DELETE FROM ONLY %s AS t USING %s AS %s WHERE %s", m.Target.Quoted(), row, pgsql.Ident(m.Alias), m.MatchCondition("t"))
	})
}

// statement returns the SQL for a change and its parameters. The SQL depends
// only on the kind of change and on which columns are text, NULL or
// unchanged, so it is built once per such shape (the hot path of the sync).
func (a *Applier) statement(kind byte, t *pglogrepl.TupleData, keyOnly bool, build func(row string) string) (string, []any) {
	shape := make([]byte, 0, len(t.Columns)+1)
	shape = append(shape, kind)
	args := make([]any, 0, len(t.Columns))
	for _, c := range t.Columns {
		shape = append(shape, c.DataType)
		if c.DataType == pglogrepl.TupleDataTypeText {
			args = append(args, string(c.Data))
		}
	}
	a.stmtMu.Lock()
	defer a.stmtMu.Unlock()
	if sql, ok := a.stmts[string(shape)]; ok {
		return sql, args
	}
	row, _ := a.sourceRow(t, keyOnly)
	sql := build(row)
	if a.stmts == nil {
		a.stmts = map[string]string{}
	}
	a.stmts[string(shape)] = sql
	return sql, args
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

package shadow

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/shadowctl/shadowctl/internal/pace"
	"gopkg.in/yaml.v3"
)

// ErrBadRequest is the family of request errors caught before anything is
// created.
var ErrBadRequest = errors.New("bad request")

// SyncMode is how green is kept current.
type SyncMode string

// Sync modes.
const (
	SyncTrigger SyncMode = "trigger"
	SyncLogical SyncMode = "logical"
)

// Request is what the operator asks for: the same fields as the flags of
// `shadowctl start` and the keys of a --plan file.
type Request struct {
	ID               string            `json:"id,omitempty" yaml:"name,omitempty"`
	Table            string            `json:"table" yaml:"table"`
	Alter            string            `json:"alter" yaml:"alter"`
	Map              map[string]string `json:"map,omitempty" yaml:"map,omitempty"`
	ReverseMap       map[string]string `json:"reverse_map,omitempty" yaml:"reverse_map,omitempty"`
	GreenSchema      string            `json:"green_schema,omitempty" yaml:"green_schema,omitempty"`
	Sync             SyncMode          `json:"sync,omitempty" yaml:"sync,omitempty"`
	BatchSize        int               `json:"batch_size,omitempty" yaml:"batch_size,omitempty"`
	MaxRowsPerSecond int               `json:"max_rows_per_second,omitempty" yaml:"max_rows_per_second,omitempty"`
	Workers          int               `json:"workers,omitempty" yaml:"workers,omitempty"`
	// LoadShare is the share of one worker's time the copy and verification
	// use while the application is busy (internal/pace); 1 turns the duty
	// cycle off.
	LoadShare        float64       `json:"load_share,omitempty" yaml:"load_share,omitempty"`
	MaxExtraStorage  int64         `json:"max_extra_storage,omitempty" yaml:"-"`
	MaxExtraStorageS string        `json:"-" yaml:"max_extra_storage,omitempty"`
	LockTimeout      time.Duration `json:"lock_timeout,omitempty" yaml:"-"`
	// MaxRetainedWAL stops a logical sync whose slot holds more WAL (bytes).
	MaxRetainedWAL  int64  `json:"max_retained_wal,omitempty" yaml:"-"`
	MaxRetainedWALS string `json:"-" yaml:"max_retained_wal,omitempty"`

	// The daemon's part (docs/daemon.md).

	// CutoverPolicy is manual (default), auto (as soon as ready, or from
	// CutoverAt) or window (only inside Window).
	CutoverPolicy string     `json:"cutover_policy,omitempty" yaml:"cutover_policy,omitempty"`
	Window        string     `json:"window,omitempty" yaml:"window,omitempty"`
	CutoverAt     *time.Time `json:"cutover_at,omitempty" yaml:"cutover_at,omitempty"`
	// AutoRollback rolls back on its own when verification after the
	// cutover finds a difference.
	AutoRollback bool `json:"auto_rollback,omitempty" yaml:"auto_rollback,omitempty"`
	// VerifyEvery is how often the daemon verifies after the cutover.
	VerifyEvery time.Duration `json:"verify_every,omitempty" yaml:"-"`
	// Hooks maps a lifecycle event to a shell command.
	Hooks map[string]string `json:"hooks,omitempty" yaml:"hooks,omitempty"`
	// ThrottleQuery pauses the copy while it returns true.
	ThrottleQuery string `json:"throttle_query,omitempty" yaml:"throttle_query,omitempty"`
	// MaxReplicaLag pauses the copy while a replica's replay lag exceeds it.
	MaxReplicaLag time.Duration `json:"max_replica_lag,omitempty" yaml:"-"`
}

// DefaultMaxRetainedWAL bounds the WAL a logical sync's slot may pin.
const DefaultMaxRetainedWAL = 16 << 30

// Defaults.
const (
	DefaultGreenSchema = "green"
	DefaultBatchSize   = 10000
	DefaultWorkers     = 2
	DefaultLockTimeout = 100 * time.Millisecond
)

// Normalize fills defaults and checks what can be checked without a database.
func (r *Request) Normalize() error {
	if r.Table == "" {
		return fmt.Errorf("%w: --table is required (schema.table or table)", ErrBadRequest)
	}
	if strings.TrimSpace(r.Alter) == "" && len(r.Map) == 0 {
		return fmt.Errorf("%w: --alter is required (the sub-commands that follow ALTER TABLE <table>)", ErrBadRequest)
	}
	if r.GreenSchema == "" {
		r.GreenSchema = DefaultGreenSchema
	}
	if r.Sync == "" {
		r.Sync = SyncTrigger
	}
	if r.Sync != SyncTrigger && r.Sync != SyncLogical {
		return fmt.Errorf("%w: --sync must be trigger or logical, not %q", ErrBadRequest, r.Sync)
	}
	if r.BatchSize <= 0 {
		r.BatchSize = DefaultBatchSize
	}
	if r.Workers <= 0 {
		r.Workers = DefaultWorkers
	}
	if r.LoadShare == 0 {
		r.LoadShare = DefaultLoadShare(r.Sync)
	}
	if r.LoadShare < 0.01 || r.LoadShare > 1 {
		return fmt.Errorf("%w: --load-share must be between 0.01 and 1 (the share of one worker's time the copy may use while the application is busy; 1: no duty cycle), not %g", ErrBadRequest, r.LoadShare)
	}
	if r.LockTimeout <= 0 {
		r.LockTimeout = DefaultLockTimeout
	}
	if r.MaxExtraStorageS != "" && r.MaxExtraStorage == 0 {
		n, err := ParseBytes(r.MaxExtraStorageS)
		if err != nil {
			return err
		}
		r.MaxExtraStorage = n
	}
	if r.MaxRetainedWALS != "" && r.MaxRetainedWAL == 0 {
		n, err := ParseBytes(r.MaxRetainedWALS)
		if err != nil {
			return err
		}
		r.MaxRetainedWAL = n
	}
	if r.MaxRetainedWAL <= 0 {
		r.MaxRetainedWAL = DefaultMaxRetainedWAL
	}
	if err := r.normalizeDaemon(); err != nil {
		return err
	}
	if r.ID != "" && !validID.MatchString(r.ID) {
		return fmt.Errorf("%w: --name %q: use 1-48 letters, digits, '-', '_' or '.'", ErrBadRequest, r.ID)
	}
	return nil
}

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$`)

// ParseBytes reads sizes such as 50GB, 512MiB, 1000000.
func ParseBytes(s string) (int64, error) {
	s = strings.TrimSpace(strings.ToUpper(s))
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"TIB", 1 << 40}, {"GIB", 1 << 30}, {"MIB", 1 << 20}, {"KIB", 1 << 10}, {"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}, {"B", 1}} {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	var f float64
	if _, err := fmt.Sscanf(s, "%g", &f); err != nil || f < 0 {
		return 0, fmt.Errorf("%w: size %q: use a number with an optional unit (KB, MB, GB, TB, KiB, MiB, GiB)", ErrBadRequest, s)
	}
	return int64(f * float64(mult)), nil
}

// LoadPlanFile reads a request from YAML or JSON.
func LoadPlanFile(path string) (Request, error) {
	var r Request
	b, err := os.ReadFile(path)
	if err != nil {
		return r, fmt.Errorf("%w: --plan: %v", ErrBadRequest, err)
	}
	if strings.EqualFold(filepath.Ext(path), ".json") {
		var raw struct {
			Request
			MaxExtraStorage string `json:"max_extra_storage"`
			ID              string `json:"name"`
		}
		if err := json.Unmarshal(b, &raw); err != nil {
			return r, fmt.Errorf("%w: --plan %s: %v", ErrBadRequest, path, err)
		}
		r = raw.Request
		r.MaxExtraStorageS, r.ID = raw.MaxExtraStorage, raw.ID
	} else if err := yaml.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("%w: --plan %s: %v", ErrBadRequest, path, err)
	}
	return r, nil
}

// ParseAssignments reads col=EXPR pairs of --map and --reverse-map.
func ParseAssignments(flag string, items []string) (map[string]string, error) {
	out := map[string]string{}
	for _, it := range items {
		col, expr, ok := strings.Cut(it, "=")
		col, expr = strings.TrimSpace(col), strings.TrimSpace(expr)
		if !ok || col == "" || expr == "" {
			return nil, fmt.Errorf("%w: --%s %q: write column=SQL-expression", ErrBadRequest, flag, it)
		}
		if strings.HasPrefix(col, `"`) && strings.HasSuffix(col, `"`) && len(col) >= 2 {
			col = strings.ReplaceAll(col[1:len(col)-1], `""`, `"`)
		}
		if _, dup := out[col]; dup {
			return nil, fmt.Errorf("%w: --%s gives column %q twice", ErrBadRequest, flag, col)
		}
		out[col] = expr
	}
	return out, nil
}

// DefaultLoadShare is --load-share's default for a sync mode: trigger sync
// costs the application its own write into green in every transaction, so
// its copy steps back further (internal/pace).
func DefaultLoadShare(mode SyncMode) float64 {
	if mode == SyncLogical {
		return pace.DefaultLoadShare
	}
	return pace.InTransactionSyncLoadShare
}

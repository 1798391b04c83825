package integration

import (
	"testing"

	"github.com/shadowctl/shadowctl/integration/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

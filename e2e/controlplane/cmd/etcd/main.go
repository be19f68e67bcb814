// Command etcd is the upstream etcd server at the version Kubernetes is built and tested with
// (go.mod), built from the go.etcd.io/etcd/server/v3 Go module. It mirrors
// go.etcd.io/etcd/server/v3/main.go. The distribution's etcd can be too old for the API
// server's watch-cache reads (RequestWatchProgress needs etcd >= 3.4.31 / 3.5.13): lists
// would then go to etcd page by page, unlike in any current cluster.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}

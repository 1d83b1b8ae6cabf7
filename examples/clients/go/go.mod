module example.com/credproxy-worker

go 1.19

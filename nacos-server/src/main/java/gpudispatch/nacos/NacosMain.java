package gpudispatch.nacos;

import com.alibaba.nacos.core.code.ControllerMethodsCache;
import javax.annotation.PostConstruct;
import org.springframework.beans.factory.annotation.Autowired;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.actuate.autoconfigure.security.servlet.ManagementWebSecurityAutoConfiguration;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.security.servlet.SecurityAutoConfiguration;
import org.springframework.boot.autoconfigure.security.servlet.UserDetailsServiceAutoConfiguration;
import org.springframework.boot.web.servlet.ServletComponentScan;
import org.springframework.scheduling.annotation.EnableScheduling;

/**
 * Main class of the Nacos 2.0.4 server, in place of the console module's {@code com.alibaba.nacos.Nacos},
 * which is not republished on Maven Central. It does what that module does, minus the web console UI:
 * <ul>
 *   <li>boots Spring over every Nacos server package (core, naming, config), as the console does,
 *       in standalone mode unless {@code -Dnacos.standalone=false} (cluster mode: the members are
 *       listed in {@code ${nacos.home}/conf/cluster.conf});</li>
 *   <li>fills the controller-method cache that Nacos's request filters look up (the console's own
 *       configuration does this; without it the naming HTTP API answers 501);</li>
 *   <li>provides Nacos's auth system, which lives in the console module: the {@code AuthManager}
 *       ({@link UsersAuthManager}), access tokens ({@link TokenManager}), the user store on Nacos's
 *       own tables ({@link UserStore}), the {@code /v1/auth/users|roles|permissions} API and an
 *       initial admin ({@link AdminBootstrap}); auth is on with {@code -Dnacos.core.auth.enabled=true};</li>
 *   <li>restores the Raft groups the republished core cannot create ({@link RaftGroupsProtocol});</li>
 *   <li>serves the console's health endpoints ({@link ConsoleHealthController}).</li>
 * </ul>
 * Spring Security's auto-configuration stays off: the console only uses it for its web UI, and
 * Nacos's own filters enforce auth on the APIs.
 */
@SpringBootApplication(scanBasePackages = {"com.alibaba.nacos", "gpudispatch.nacos"},
        exclude = {SecurityAutoConfiguration.class, UserDetailsServiceAutoConfiguration.class,
                ManagementWebSecurityAutoConfiguration.class})
@ServletComponentScan(basePackages = "com.alibaba.nacos")
@EnableScheduling
public class NacosMain {

    @Autowired
    private ControllerMethodsCache methodsCache;

    public static void main(String[] args) {
        if (System.getProperty("nacos.standalone") == null) {
            System.setProperty("nacos.standalone", "true");
        }
        try {
            SpringApplication.run(NacosMain.class, args);
        } catch (Throwable failure) {
            // Spring has logged why; without this, JRaft's and gRPC's threads keep a failed server's
            // JVM alive (the console's main class has the same flaw).
            System.exit(1);
        }
    }

    @PostConstruct
    public void initControllerMethods() {
        methodsCache.initClassMethod("com.alibaba.nacos.core.controller");
        methodsCache.initClassMethod("com.alibaba.nacos.naming.controllers");
        methodsCache.initClassMethod("com.alibaba.nacos.config.server.controller");
        methodsCache.initClassMethod("gpudispatch.nacos");
    }
}
